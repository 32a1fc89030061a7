"""docker compose files (validated by the real `docker compose config`), the Prometheus scrape
configuration (validated by `promtool`) and the Grafana provisioning files.

docker compose and promtool come from scripts/install-tools.sh (idempotent; `make tools` runs it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.installed_tools import tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"


def compose_config(*files: Path) -> dict[str, Any]:
    """The merged, interpolated model that `docker compose config` prints (fails on invalid files)."""
    cmd = shlex.split(tool("compose"))
    for f in files:
        cmd += ["-f", str(f)]
    proc = subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=120, cwd=DEPLOY,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return compose_config(COMPOSE)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return compose_config(COMPOSE, COMPOSE_GPU)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(
    variant: str, request: pytest.FixtureRequest
) -> None:
    services = request.getfixturevalue(variant)["services"]
    assert set(services) == {"engine", "gateway", "prometheus", "grafana"}
    for name, svc in services.items():
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services and cond["condition"] == "service_healthy", (name, dep)
    chain = {name: set(svc.get("depends_on", {})) for name, svc in services.items()}
    assert chain == {"engine": set(), "gateway": {"engine"}, "prometheus": {"gateway"}, "grafana": {"prometheus"}}


def test_cpu_stack_builds_the_images_from_the_dockerfile(cpu: dict[str, Any]) -> None:
    services = cpu["services"]
    targets = {name: svc["build"]["target"] for name, svc in services.items() if "build" in svc}
    assert targets == {"engine": "engine-cpu", "gateway": "gateway"}
    for svc in services.values():
        if "build" in svc:
            assert Path(svc["build"]["context"]).resolve() == ROOT
    engine, gateway = services["engine"], services["gateway"]
    assert engine["command"][0] == "engine"
    spec = json.loads(engine["environment"]["SPECSERVE_SPECULATIVE_CONFIG"])
    assert spec["method"] == "ngram"
    # Empty SPECSERVE_MODEL = the demo model shipped in the image.
    assert engine["environment"]["SPECSERVE_MODEL"] == ""
    assert engine["environment"]["SPECSERVE_HEALTH_URL"].endswith(":8100/health")
    assert "--replica=http://engine:8100" in gateway["command"]
    published = [int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1])
                 for p in gateway["ports"]]
    assert published == [8000]


def test_gpu_override_reserves_nvidia_gpus(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    engine = gpu["services"]["engine"]
    assert engine["build"]["target"] == "engine-gpu"
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in cpu["services"]["engine"]
    # The override keeps the rest of the stack.
    assert gpu["services"]["gateway"] == cpu["services"]["gateway"]


def test_prometheus_config_is_valid_and_scrapes_the_compose_services(cpu: dict[str, Any]) -> None:
    proc = subprocess.run([tool("promtool"), "check", "config", str(PROMETHEUS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"specserve-gateway", "specserve-engine"}
    services = cpu["services"]
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, target
                assert f":{port}/health" in services[host]["environment"]["SPECSERVE_HEALTH_URL"], target
    assert jobs["specserve-engine"]["static_configs"][0]["labels"]["drafter"] == "ngram"
    mounts = services["prometheus"]["volumes"]
    assert any(Path(str(m["source"] if isinstance(m, dict) else m.split(":")[0])).resolve() == PROMETHEUS.resolve()
               for m in mounts)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(cpu: dict[str, Any]) -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads((GRAFANA / "dashboards" / "specserve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "specserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    volumes = cpu["services"]["grafana"]["volumes"]
    targets = {str(v["target"]) if isinstance(v, dict) else v.split(":")[1] for v in volumes}
    assert path in targets and "/etc/grafana/provisioning" in targets
