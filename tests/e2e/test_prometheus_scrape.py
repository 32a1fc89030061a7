"""A real Prometheus, configured from deploy/prometheus/prometheus.yml, scrapes a real
`specserve serve` (engine with n-gram speculation + gateway) on 127.0.0.1; PromQL answers the
request counter and the acceptance rate, and every Grafana panel's query names metrics that exist.

prometheus comes from scripts/install-tools.sh (idempotent; `make tools` runs it too).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from specserve.engine.process import free_port
from support.installed_tools import tool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "specserve.json"
SPEC_CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
# The compose service each scrape job points at (deploy/docker-compose.yml).
COMPOSE_TARGETS = {"specserve-gateway": "gateway:9100", "specserve-engine": "engine:8100"}  # gateway: --metrics-port
START_TIMEOUT_S = 420.0
FUNCTIONS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                          "unless", "bool", "offset"}


def wait_until(what: str, check: Any, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> Any:
    """Poll ``check()`` until it returns something truthy (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(1.0)
    raise AssertionError(f"{what}: not ready after {timeout_s:.0f} s (last: {last!r})")


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def kill_engine_on_port(port: int) -> None:
    """SIGKILL a vLLM server still listening on our engine port (only if `serve` could not stop it)."""
    needle = ["vllm.entrypoints.openai.api_server", "--port", str(port)]
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            argv = (proc_dir / "cmdline").read_bytes().decode(errors="ignore").split("\0")
        except OSError:
            continue
        if needle[0] in argv and "--port" in argv and argv[argv.index("--port") + 1] == needle[2]:
            try:
                os.killpg(int(proc_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def derived_prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with each compose target replaced by a local address."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(COMPOSE_TARGETS)
    for name, job in jobs.items():
        for static in job["static_configs"]:
            assert static["targets"] == [COMPOSE_TARGETS[name]]
            static["targets"] = [targets[name]]
    return config


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (same rules as tests/unit/test_deploy_dashboard.py)."""
    import re

    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    return {m.group(0) for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text)
            if not text[m.end():].lstrip().startswith("(") and m.group(0) not in FUNCTIONS_AND_KEYWORDS}


class Prom:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10.0, trust_env=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def names(self) -> set[str]:
        return set(self.client.get("/api/v1/label/__name__/values").json()["data"])


@pytest.fixture(scope="module")
def stack(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("scrape")
    gateway_port, engine_port, prom_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    serve = subprocess.Popen(
        [sys.executable, "-m", "specserve.cli", "serve", "--model", str(demo_model_dir),
         "--host", "127.0.0.1", "--port", str(gateway_port), "--engine-port", str(engine_port),
         "--speculative-config", json.dumps(SPEC_CONFIG), "--max-model-len", "512",
         "--max-tokens-cap", "128", "--metrics-port", str(metrics_port), "--engine-log", str(work / "engine.log"), "--", "--max-num-seqs", "4"],
        env=env, stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )
    config = derived_prometheus_config({"specserve-gateway": f"127.0.0.1:{metrics_port}",
                                        "specserve-engine": f"127.0.0.1:{engine_port}"})
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=open(work / "prometheus.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )
    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        with httpx.Client(trust_env=False, timeout=5.0) as http:
            wait_until("prometheus", lambda: http.get(f"http://127.0.0.1:{prom_port}/-/ready").status_code == 200,
                       60, prometheus)
            wait_until("specserve serve", lambda: http.get(f"{gateway}/ready").status_code == 200,
                       START_TIMEOUT_S, serve)
        yield {"gateway": gateway, "prom": Prom(f"http://127.0.0.1:{prom_port}"), "work": work}
    finally:
        stop(prometheus, 20)
        stop(serve, 60)
        kill_engine_on_port(engine_port)


@pytest.fixture(scope="module")
def scraped(stack: dict[str, Any]) -> dict[str, Any]:
    """Send traffic through the gateway, then wait until Prometheus has scraped its effects."""
    client = OpenAI(base_url=stack["gateway"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"
    for _ in range(3):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=48, temperature=0)
        assert out.choices[0].text
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert chunks
    # Over the gateway's --max-tokens-cap: refused before the engine (rejected_requests counter).
    too_long = httpx.post(stack["gateway"] + "/v1/completions", timeout=30, trust_env=False,
                          json={"model": model, "prompt": "x", "max_tokens": 100_000})
    assert too_long.status_code == 400
    prom: Prom = stack["prom"]

    def drafted_and_counted() -> bool:
        drafts = prom.query('sum(vllm:spec_decode_num_draft_tokens_total{job="specserve-engine"})')
        reqs = prom.query('sum(specserve_gateway_requests_total{job="specserve-gateway", route="/v1/completions"})')
        return bool(drafts and float(drafts[0]["value"][1]) > 0 and reqs and float(reqs[0]["value"][1]) >= 5)

    wait_until("scrape after traffic", drafted_and_counted, 60)
    # rate() windows need two samples holding the traffic: one more scrape of every target after the
    # one that was seen to hold it.
    counted_at = time.time()

    def scraped_again() -> bool:
        last = prom.query("min(timestamp(up))")
        return bool(last and float(last[0]["value"][1]) > counted_at)

    wait_until("a scrape of every target after the traffic was counted", scraped_again, 60)
    return {"model": model, **stack}


def test_both_targets_are_up(scraped: dict[str, Any]) -> None:
    up = {r["metric"]["job"]: float(r["value"][1]) for r in scraped["prom"].query("up")}
    assert up == {"specserve-gateway": 1.0, "specserve-engine": 1.0}


def test_gateway_request_counter(scraped: dict[str, Any]) -> None:
    rows = scraped["prom"].query('sum by (route, status) (specserve_gateway_requests_total{route="/v1/completions"})')
    by_status = {r["metric"]["status"]: float(r["value"][1]) for r in rows}
    assert by_status.get("200", 0) >= 4
    assert by_status.get("400", 0) >= 1


def test_acceptance_rate_per_drafter(scraped: dict[str, Any]) -> None:
    rows = scraped["prom"].query(
        "sum by (drafter) (vllm:spec_decode_num_accepted_tokens_total)"
        " / sum by (drafter) (vllm:spec_decode_num_draft_tokens_total)")
    assert [r["metric"] for r in rows] == [{"drafter": "ngram"}]
    rate = float(rows[0]["value"][1])
    assert math.isfinite(rate) and 0.0 <= rate <= 1.0


def test_every_dashboard_query_names_scraped_metrics_and_returns_data(scraped: dict[str, Any]) -> None:
    prom: Prom = scraped["prom"]
    available = prom.names()
    dashboard = json.loads(DASHBOARD.read_text())
    missing, empty = [], []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            missing += [(panel["title"], n) for n in sorted(names - available)]
            if not prom.query(target["expr"]):
                empty.append((panel["title"], target["expr"]))
    assert not missing, missing
    assert not empty, empty
