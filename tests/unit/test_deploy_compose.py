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


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The merged, interpolated model that `docker compose config` prints (fails on invalid files)."""
    cmd = shlex.split(tool("compose"))
    for f in files:
        cmd += ["-f", str(f)]
    proc = subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=120, cwd=DEPLOY,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), **(env or {})})
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
    assert [port(p)["target"] for p in gateway["ports"]] == [8000]


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
                host, number = target.rsplit(":", 1)
                assert host in services, target
                listening = {services[host]["environment"]["SPECSERVE_HEALTH_URL"].rsplit(":", 1)[1].split("/")[0]}
                listening |= {a.split("=", 1)[1] for a in services[host]["command"] if a.startswith("--metrics-port=")}
                assert number in listening, target
    assert jobs["specserve-gateway"]["static_configs"][0]["targets"] == ["gateway:9100"]  # its metrics port
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


def port(p: Any) -> dict[str, Any]:
    """One `ports` entry as compose v1 (string) or v2 (mapping) prints it: host_ip, published, target."""
    if isinstance(p, dict):
        return {"host_ip": p.get("host_ip", ""), "published": int(p["published"]), "target": int(p["target"])}
    parts = str(p).split("/")[0].split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return {"host_ip": host_ip, "published": int(parts[-2]), "target": int(parts[-1])}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_no_port_is_published_beyond_loopback_by_default(variant: str, request: pytest.FixtureRequest) -> None:
    services = request.getfixturevalue(variant)["services"]
    published = {name: [port(p) for p in svc.get("ports", [])] for name, svc in services.items()}
    assert {n for n, ports in published.items() if ports} == {"gateway", "prometheus", "grafana"}
    for name, ports in published.items():
        for p in ports:
            assert p["host_ip"] == "127.0.0.1", (name, p)  # "" or 0.0.0.0 would be every interface
    assert "ports" not in services["engine"]  # reachable only on the compose network, with its key


def test_every_service_is_closed_without_relying_on_loopback(cpu: dict[str, Any]) -> None:
    services = cpu["services"]
    prometheus = services["prometheus"]
    assert not [a for a in prometheus["command"] if "enable-lifecycle" in a or "enable-admin-api" in a]
    grafana = services["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana  # never admin/admin, never inline
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    gateway, engine = services["gateway"], services["engine"]
    assert gateway["environment"]["SPECSERVE_API_KEYS_FILE"] == "/run/secrets/api_keys"
    for svc in (gateway, engine):
        assert svc["environment"]["SPECSERVE_ENGINE_API_KEY_FILE"] == "/run/secrets/engine_api_key"
        assert not [k for k in svc["environment"] if k in ("SPECSERVE_API_KEYS", "SPECSERVE_ENGINE_API_KEY",
                                                            "SPECSERVE_ALLOW_UNAUTHENTICATED")]
    mounted = {name: {s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", [])}
               for name, svc in services.items()}
    assert mounted["gateway"] == {"api_keys", "engine_api_key"} and mounted["engine"] == {"engine_api_key"}
    assert mounted["grafana"] == {"grafana_admin_password"}
    for name in ("api_keys", "engine_api_key", "grafana_admin_password"):
        assert Path(cpu["secrets"][name]["file"]).parent == DEPLOY / "secrets"
    # Publishing the gateway beyond loopback is a choice of address only: the keys stay required.
    wide = compose_config(COMPOSE, env={"SPECSERVE_GATEWAY_BIND": "0.0.0.0"})["services"]["gateway"]
    assert [port(p)["host_ip"] for p in wide["ports"]] == ["0.0.0.0"]
    assert wide["environment"]["SPECSERVE_API_KEYS_FILE"] == "/run/secrets/api_keys"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for part in __import__("re").findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        number, unit = part
        total += float(number) * units[unit]
    assert number, duration
    return total


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_stop_grace_outlasts_the_drains(variant: str, request: pytest.FixtureRequest) -> None:
    services = request.getfixturevalue(variant)["services"]
    engine, gateway = services["engine"], services["gateway"]
    shutdown = [int(a.split("=", 1)[1]) for a in engine["command"] if a.startswith("--shutdown-timeout=")]
    assert len(shutdown) == 1 and shutdown[0] > 0  # vLLM's default 0 aborts in-flight requests
    assert _seconds(engine["stop_grace_period"]) > shutdown[0]
    drain = [float(a.split("=", 1)[1]) for a in gateway["command"] if a.startswith("--drain-timeout=")]
    assert len(drain) == 1 and _seconds(gateway["stop_grace_period"]) > drain[0]


def test_make_secrets_creates_each_secret_once(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    script = DEPLOY / "make-secrets.sh"
    first = subprocess.run(["sh", str(script), str(secrets_dir)], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    made = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    assert set(made) == {"api-keys", "engine-api-key", "grafana-admin-password"}
    assert len(set(made.values())) == 3 and all(len(v.strip()) == 64 for v in made.values())
    assert oct(secrets_dir.stat().st_mode & 0o777) == "0o700"
    again = subprocess.run(["sh", str(script), str(secrets_dir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and {p.name: p.read_text() for p in secrets_dir.iterdir()} == made
    assert made["api-keys"].strip() in again.stdout  # the client key, for the first request
    config = compose_config(COMPOSE, env={"SPECSERVE_SECRETS_DIR": str(secrets_dir)})
    assert Path(config["secrets"]["api_keys"]["file"]) == secrets_dir / "api-keys"
    assert (DEPLOY / "secrets" / ".gitignore").read_text().split() == ["*", "!.gitignore"]
