"""Render the Helm chart with the real `helm template` and pick objects out of the manifests
(shared by the chart tests). SPECSERVE_TEST_CHART points the tests at another copy of the chart,
e.g. an older commit's, to see which checks it fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support.installed_tools import tool

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(os.environ.get("SPECSERVE_TEST_CHART") or ROOT / "helm" / "specserve")
VALUES = {
    "default": [],
    "gpu": ["-f", str(CHART / "values-gpu.yaml")],
    "minimal": ["-f", str(CHART / "values-minimal.yaml")],
}
NAMESPACE = "llm"
RELEASE = "rel"
GATEWAY = f"{RELEASE}-specserve-gateway"
ENGINE = f"{RELEASE}-specserve-engine"
# API groups of the optional CRDs, as `helm template --api-versions` announces them.
PROMETHEUS_OPERATOR = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                       "--api-versions", "monitoring.coreos.com/v1/PodMonitor"]
LWS = ["--api-versions", "leaderworkerset.x-k8s.io/v1"]
KEDA = ["--api-versions", "keda.sh/v1alpha1/ScaledObject"]

Doc = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)


def render(*args: str) -> list[Doc]:
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(*args: str) -> str:
    """stderr of a render that must fail (asserts that it does)."""
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode != 0, f"rendered although it should fail: {args}"
    return proc.stderr


def sets(**values: object) -> list[str]:
    """`--set` arguments; keys use __ for dots: sets(engine__gpus=4)."""
    out: list[str] = []
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key.replace('__', '.')}={text}"]
    return out


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def container(docs: list[Doc], name: str, kind: str = "Deployment") -> Doc:
    (c,) = pod_spec(by_kind(docs, kind)[name])["containers"]
    return c


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
