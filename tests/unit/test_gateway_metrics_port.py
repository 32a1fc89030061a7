"""``--metrics-port``: the real ``specserve gateway`` process serves /metrics on a second port (what
the Helm chart's scrapers use, a port no ingress routes), with the live queue-depth gauge."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from support.gateway_fake_engine import free_port, running_fake_engine


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            response = httpx.get(url, timeout=2, trust_env=False)
            if response.status_code == 200:
                return response
            last = f"status {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"{url}: {last} after {timeout_s} s\n{log.read_text()[-3000:]}")


def test_metrics_port_serves_gateway_metrics_only(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    with running_fake_engine() as (engine_url, _), open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "specserve.cli", "gateway", f"--replica={engine_url}", "--port", str(port),
             "--metrics-port", str(metrics_port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(f"http://127.0.0.1:{port}/ready", proc, log)
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5, trust_env=False).raise_for_status()
            text = _wait_for(f"http://127.0.0.1:{metrics_port}/metrics", proc, log).text
            assert "specserve_gateway_queue_depth_requests 0.0" in text, text[:2000]
            served = [line for line in text.splitlines() if line.startswith("specserve_gateway_requests_total{")
                      and 'route="/v1/models"' in line and 'status="200"' in line]
            assert served and served[0].endswith(" 1.0"), text[:2000]
            api = httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models", timeout=5, trust_env=False)
            assert "fake-model" not in api.text  # the metrics port serves metrics, not the API
        finally:
            proc.send_signal(signal.SIGTERM)
            # uvicorn re-raises the SIGTERM it handled after its graceful shutdown.
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    try:
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2, trust_env=False)
        raise AssertionError("the metrics port still answers after the gateway stopped")
    except httpx.ConnectError:
        pass
