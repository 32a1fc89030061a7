"""The Helm chart: `helm lint` and `helm template` with the default, GPU and minimal values, and
checks of the rendered manifests (probes, resources, selectors, secrets, GPUs).

helm comes from scripts/install-tools.sh (idempotent; `make tools` runs it too).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.helm_render import (
    CHART,
    NAMESPACE,
    PROMETHEUS_OPERATOR,
    RELEASE,
    ROOT,
    VALUES,
    by_kind,
    env_of,
    helm,
    matches,
    pod_spec,
    render,
    render_error,
    sets,
)

STABLE_SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(*VALUES[request.param])


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_passes(values: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *VALUES[values])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_every_workload_has_probes_resources_and_non_root(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deployments = by_kind(docs, "Deployment")
    assert {f"{RELEASE}-specserve-gateway", f"{RELEASE}-specserve-engine"} <= set(deployments)
    for name, dep in deployments.items():
        spec = pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for c in spec["containers"]:
            port_names = {p["name"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, (name, probe)
                get = c[probe]["httpGet"]
                assert get["path"].startswith("/") and get["port"] in port_names, (name, probe)
            for key in ("requests", "limits"):
                assert c["resources"][key].get("cpu") and c["resources"][key].get("memory"), (name, key)
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_engine_probes_health_and_has_a_startup_probe(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    engine = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])["containers"][0]
    assert engine["startupProbe"]["httpGet"]["path"] == "/health"
    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    gateway = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"


def test_selectors_are_stable_and_match_pod_labels(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deployments = by_kind(docs, "Deployment")
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, dep in deployments.items():
        sel = dep["spec"]["selector"]["matchLabels"]
        assert set(sel) == STABLE_SELECTOR_KEYS, name  # no version/chart label: upgrades keep pods
        assert matches(sel, pod_labels[name]), name
    components = {n: lbl["app.kubernetes.io/component"] for n, lbl in pod_labels.items()}
    assert sorted(components.values()) == ["engine", "gateway"]
    for name, svc in by_kind(docs, "Service").items():
        targets = [n for n, lbl in pod_labels.items() if matches(svc["spec"]["selector"], lbl)]
        assert len(targets) == 1, (name, targets)  # each Service selects exactly one component
        container = pod_spec(deployments[targets[0]])["containers"][0]
        port_names = {p["name"] for p in container["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, name
    for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
        assert any(matches(pdb["spec"]["selector"]["matchLabels"], lbl) for lbl in pod_labels.values()), name


def test_gateway_discovers_engines_through_the_headless_service(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    services = by_kind(docs, "Service")
    headless = services[f"{RELEASE}-specserve-engine-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    gateway = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]
    assert gateway["args"][0] == "gateway"
    dns = [a.split("=", 1)[1] for a in gateway["args"] if a.startswith("--replicas-dns=")]
    port = headless["spec"]["ports"][0]["port"]
    assert dns == [f"{RELEASE}-specserve-engine-headless.{NAMESPACE}.svc:{port}"]


def gateway_args(docs: list[dict[str, Any]]) -> list[str]:
    return pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]["args"]


def test_prompt_token_cap_is_off_by_default(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    assert not [a for a in gateway_args(docs) if "max-prompt-tokens" in a]


def test_prompt_token_cap_becomes_a_gateway_flag(tmp_path: Path) -> None:
    args = gateway_args(render("--set", "gateway.maxPromptTokens=4096",
                               "--set", "gateway.extraArgs[0]=--rate-limit-tpm=100000"))
    assert [a for a in args if "max-prompt-tokens" in a] == ["--max-prompt-tokens=4096"]
    assert args.index("--max-prompt-tokens=4096") < args.index("--rate-limit-tpm=100000")  # extraArgs win
    # A values file gives YAML numbers (floats to Go templates): still a plain integer, not 1e+06.
    values = tmp_path / "values.yaml"
    values.write_text("gateway:\n  maxPromptTokens: 1000000\n")
    assert "--max-prompt-tokens=1000000" in gateway_args(render("-f", str(values)))
    assert not [a for a in gateway_args(render("--set", "gateway.maxPromptTokens=0")) if "max-prompt" in a]


def test_gpu_values_request_nvidia_gpus_and_default_does_not(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    engine_spec = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])
    res = engine_spec["containers"][0]["resources"]
    if name == "gpu":
        assert res["limits"]["nvidia.com/gpu"] == 1
        assert res["requests"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in engine_spec["tolerations"])
        assert engine_spec["containers"][0]["image"].startswith("specserve-engine-gpu:")
        claim = [v for v in engine_spec["volumes"] if v["name"] == "model"][0]
        assert claim["persistentVolumeClaim"]["claimName"] == "specserve-models"
    else:
        assert "nvidia.com/gpu" not in json.dumps(res)
        assert engine_spec["containers"][0]["image"].startswith("specserve-engine-cpu:")
    gateway_res = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in json.dumps(gateway_res)


def test_speculative_config_follows_the_drafter(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    engine = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])["containers"][0]
    env = env_of(engine)
    if name == "minimal":
        assert "SPECSERVE_SPECULATIVE_CONFIG" not in env
        assert by_kind(docs, "PodDisruptionBudget") == {}
    else:
        cfg = json.loads(env["SPECSERVE_SPECULATIVE_CONFIG"]["value"])
        assert cfg["method"] == "ngram" and cfg["num_speculative_tokens"] >= 1
        assert cfg["prompt_lookup_min"] <= cfg["prompt_lookup_max"]


def test_api_keys_come_from_a_created_secret_and_are_never_inlined() -> None:
    secret_value = "sk-specserve-test-4f1c"
    docs = render("--set", "auth.enabled=true", "--set", f"auth.apiKeys[0]={secret_value}",
                  "--set", "auth.apiKeys[1]=second-key")
    secrets = by_kind(docs, "Secret")
    assert sorted(secrets) == [f"{RELEASE}-specserve-api-keys", f"{RELEASE}-specserve-engine-key"]
    stored = base64.b64decode(secrets[f"{RELEASE}-specserve-api-keys"]["data"]["api-keys"]).decode()
    assert stored == f"{secret_value},second-key"
    for doc in docs:
        if doc["kind"] != "Secret":
            assert secret_value not in yaml.safe_dump(doc), doc["metadata"]["name"]
            assert base64.b64encode(stored.encode()).decode() not in yaml.safe_dump(doc)
    gateway = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]
    ref = env_of(gateway)["SPECSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": f"{RELEASE}-specserve-api-keys", "key": "api-keys"}


def test_api_keys_from_an_existing_secret() -> None:
    docs = render("--set", "auth.enabled=true", "--set", "auth.existingSecret=team-keys",
                  "--set", "auth.secretKey=tokens")
    assert list(by_kind(docs, "Secret")) == [f"{RELEASE}-specserve-engine-key"]
    gateway = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]
    assert env_of(gateway)["SPECSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "tokens"}


def test_auth_is_on_by_default_with_a_generated_key() -> None:
    docs = render()
    secret = by_kind(docs, "Secret")[f"{RELEASE}-specserve-api-keys"]
    (key,) = base64.b64decode(secret["data"]["api-keys"]).decode().split(",")
    assert key.startswith("sk-") and len(key) >= 40
    gateway = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-gateway"])["containers"][0]
    env = env_of(gateway)
    assert env["SPECSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-specserve-api-keys"
    assert "SPECSERVE_ALLOW_UNAUTHENTICATED" not in env
    assert key not in yaml.safe_dump(by_kind(docs, "Deployment"))


@pytest.mark.parametrize("bad", ["engine.device=tpu", "gateway.replicaCount=0", "model.source=s3",
                                 "speculation.policy=random", "gateway.maxPromptTokens=-1", "unknownKey=1"])
def test_schema_rejects_invalid_values(bad: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--set", bad)
    assert proc.returncode != 0, bad
    assert "schema" in proc.stderr.lower() or "at '/" in proc.stderr, proc.stderr


def test_model_sources_mount_the_model() -> None:
    engine_name = f"{RELEASE}-specserve-engine"
    pvc = render("--set", "model.source=pvc", "--set", "model.pvc.claimName=models", "--set", "model.path=llama")
    spec = pod_spec(by_kind(pvc, "Deployment")[engine_name])
    assert env_of(spec["containers"][0])["SPECSERVE_MODEL"]["value"] == "/models/llama"
    volume = [v for v in spec["volumes"] if v["name"] == "model"][0]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}

    host = render("--set", "model.source=hostPath", "--set", "model.hostPath.path=/data/models")
    spec = pod_spec(by_kind(host, "Deployment")[engine_name])
    assert [v["hostPath"]["path"] for v in spec["volumes"] if v["name"] == "model"] == ["/data/models"]

    rev = "0123456789abcdef0123456789abcdef01234567"
    dl = render("--set", "model.source=download", "--set", "model.download.repo=org/model",
                "--set", f"model.download.revision={rev}", "--set", "model.download.tokenSecret.name=hub-token")
    spec = pod_spec(by_kind(dl, "Deployment")[engine_name])
    init = spec["initContainers"][0]
    assert env_of(init)["MODEL_REPO"]["value"] == "org/model"
    assert env_of(init)["MODEL_REVISION"]["value"] == rev
    assert env_of(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hub-token"
    assert env_of(spec["containers"][0])["SPECSERVE_MODEL"]["value"] == env_of(init)["MODEL_DIR"]["value"]
    assert env_of(init)["MODEL_DIR"]["value"] == f"/models/org/model/{rev}"

    demo = render()
    assert "SPECSERVE_MODEL" not in env_of(pod_spec(by_kind(demo, "Deployment")[engine_name])["containers"][0])


def test_optional_ingress_hpa_and_service_monitor() -> None:
    docs = render("--set", "gateway.ingress.enabled=true", "--set", "gateway.autoscaling.enabled=true",
                  "--set", "metrics.serviceMonitor.enabled=true", *PROMETHEUS_OPERATOR)
    gateway_name = f"{RELEASE}-specserve-gateway"
    assert "replicas" not in by_kind(docs, "Deployment")[gateway_name]["spec"]  # the HPA owns it
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[gateway_name]
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway_name
    ingress = by_kind(docs, "Ingress")[gateway_name]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == gateway_name and backend["port"]["name"] == "http"
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    for mon in monitors.values():
        selected = [s for s in services.values() if matches(mon["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(selected) == 1
        assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    default = render()
    for kind in ("Ingress", "HorizontalPodAutoscaler", "ServiceMonitor"):
        assert by_kind(default, kind) == {}


def test_notes_render() -> None:
    proc = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert proc.returncode == 0, proc.stderr
    assert f"port-forward service/{RELEASE}-specserve-gateway" in proc.stdout
    assert f"Secret {RELEASE}-specserve-api-keys" in proc.stdout
    assert "--wait --timeout 16m" in proc.stdout  # startup budget 600 s + 300 s, in minutes + 1


@pytest.mark.parametrize(("drafter", "expected"), [
    ("recycling", {"method": "custom_class", "num_speculative_tokens": 3,
                   "model": "specserve_vllm.drafters.recycling_proposer.RecyclingProposer"}),
    ("hydra", {"method": "custom_class", "num_speculative_tokens": 3,
               "model": "specserve_vllm.heads.proposer.HydraProposer"}),
    ("medusa", {"method": "custom_class", "num_speculative_tokens": 3,
                "model": "specserve_vllm.heads.proposer.MedusaProposer"}),
    ("vllm-medusa", {"method": "medusa", "num_speculative_tokens": 3}),
    ("eagle", {"method": "eagle", "num_speculative_tokens": 3}),
])
def test_drafter_choice_builds_the_engine_speculative_config(drafter: str, expected: dict[str, Any]) -> None:
    docs = render("--set", f"speculation.drafter={drafter}", "--set", "speculation.numSpeculativeTokens=3")
    engine = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])
    assert json.loads(env_of(engine["containers"][0])["SPECSERVE_SPECULATIVE_CONFIG"]["value"]) == expected
    assert by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"]["spec"]["template"]["metadata"][
        "labels"]["specserve.io/drafter"] == drafter
    assert env_of(engine["containers"][0])["SPECSERVE_DRAFTER"]["value"] == drafter


def test_a_tree_budget_sets_the_engines_draft_slots_and_needs_a_tree() -> None:
    docs = render(*sets(speculation__drafter="hydra", speculation__tree="dynamic", speculation__treeBudget=16))
    engine = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])
    config = json.loads(env_of(engine["containers"][0])["SPECSERVE_SPECULATIVE_CONFIG"]["value"])
    assert config["num_speculative_tokens"] == 16
    assert env_of(engine["containers"][0])["SPECSERVE_TREE"]["value"] == "dynamic"
    err = render_error(*sets(speculation__drafter="hydra", speculation__treeBudget=16))
    assert "speculation.treeBudget needs speculation.tree static or dynamic" in err


def test_head_checkpoint_reaches_the_engine() -> None:
    docs = render("--set", "speculation.drafter=hydra", "--set", "speculation.heads=/models/heads/hydra")
    engine = pod_spec(by_kind(docs, "Deployment")[f"{RELEASE}-specserve-engine"])
    assert env_of(engine["containers"][0])["SPECSERVE_HEADS_DIR"]["value"] == "/models/heads/hydra"


def test_install_tools_is_idempotent_and_gives_helm_v4() -> None:
    runs = [subprocess.run(["bash", str(ROOT / "scripts" / "install-tools.sh")], check=True,
                           capture_output=True, text=True, timeout=600).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    tools = dict(line.split("=", 1) for line in runs[0].splitlines())
    assert {"helm", "prometheus", "promtool", "compose"} <= set(tools)
    for name in ("helm", "prometheus", "promtool"):
        assert Path(tools[name]).is_file(), name
    assert helm("version", "--short").stdout.startswith("v4.")
