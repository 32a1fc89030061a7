"""``specserve serve --drafter recycling --spec-policy goodput`` on the demo model: the gateway's
``spec_k`` reaches the engine (the per-request metrics show at most ``k`` drafts a step), a client's
own ``spec_k`` wins, each response tells the k it got, and the acceptance lands in the gateway's
Prometheus metrics."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support.specserve_process import MODEL_NAME, running_specserve

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def _complete(client: httpx.Client, base: str, **extra: object) -> tuple[int, dict]:
    r = client.post(f"{base}/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 32, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    spec = body["metrics"]["speculative_decoding"]
    k = int(r.headers["x-specserve-spec-k"])
    # What the request got, as the response tells it: within its budget, and the engine's own
    # per-step drafts agree (the engine reports at the detailed level).
    mean, top = float(r.headers["x-specserve-spec-k-mean"]), int(r.headers["x-specserve-spec-k-max"])
    drafted = spec.get("per_step_drafted") or []  # absent when no step drafted
    assert len(drafted) == spec["num_spec_steps"]
    assert top == max(drafted, default=0) and 0 <= mean <= top <= k
    steps = body["usage"]["completion_tokens"] - 1 - spec["num_accepted_draft_tokens"]
    assert mean == round(spec["num_draft_tokens"] / max(steps, spec["num_spec_steps"], 1), 3)
    return k, spec


def test_gateway_spec_k_reaches_the_engine(demo_model_dir: Path, tmp_path: Path) -> None:
    args = ["--drafter", "recycling", "--num-speculative-tokens", "4",
            "--spec-policy", "goodput", "--spec-k-max", "2",
            # Explicit step-time start values (GPU-like): the test is about the mechanism, not
            # the CPU calibration, under which k = 1 and k = 2 are nearly tied at the prior.
            "--spec-step-base-ms", "20", "--spec-step-token-ms", "0.5"]
    with running_specserve(demo_model_dir, args, log_dir=tmp_path) as server, \
            httpx.Client(trust_env=False, timeout=120) as client:
        base = server.base_url
        k, spec = _complete(client, base)
        assert k == 2  # idle, prior acceptance: the largest k allowed
        assert spec["num_spec_tokens"] == 4 and spec["num_spec_steps"] > 0
        assert 0 < spec["num_draft_tokens"] <= k * spec["num_spec_steps"]
        assert max(i for i, c in enumerate(spec["acceptance_histogram"]) if c) <= k

        k, spec = _complete(client, base, vllm_xargs={"spec_k": 0})
        assert k == 0 and spec["num_draft_tokens"] == 0
        k, spec = _complete(client, base, vllm_xargs={"spec_k": 1})
        assert k == 1 and 0 < spec["num_draft_tokens"] <= spec["num_spec_steps"]

        stream = client.post(f"{base}/v1/completions", json={
            "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}})
        assert stream.status_code == 200 and stream.headers["x-specserve-spec-k"] in "012"

        text = client.get(f"{base}/metrics").text
    values = {(s.name, s.labels.get("source", "")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples
              if s.labels.get("model") == MODEL_NAME}
    assert values[("specserve_spec_draft_tokens_total", "")] > 0
    assert values[("specserve_spec_acceptance_length_count", "")] == 3  # spec_k=0 had no steps
    assert values[("specserve_spec_k_count", "goodput")] == 2
    assert values[("specserve_spec_k_count", "client")] == 2
    assert values[("specserve_spec_k_used_count", "")] == 4  # every response with metrics, stream too
    assert 0.0 < values[("specserve_spec_alpha_ratio", "")] < 1.0


def test_the_gateway_prices_requests_with_the_engines_own_model(demo_model_dir: Path, tmp_path: Path) -> None:
    """With the engine's per-step goodput policy on, the engine exports its live cost model and
    the gateway's goodput policy chooses ``spec_k`` with it (one model at both levels)."""
    from specserve.gateway.engine_model import engine_budget, parse_page

    args = ["--drafter", "recycling", "--num-speculative-tokens", "4",
            "--spec-policy", "goodput", "--engine-spec-policy", "goodput"]
    with running_specserve(demo_model_dir, args, log_dir=tmp_path) as server, \
            httpx.Client(trust_env=False, timeout=120) as client:
        base = server.base_url

        def decisions() -> dict[str, float]:
            return {s.labels["cost_model"]: s.value
                    for f in text_string_to_metric_families(client.get(f"{base}/metrics").text)
                    for s in f.samples if s.name == "specserve_spec_decisions_total"}

        # The engine publishes its model after its first planned steps; the gateway reads it at
        # its next probe. Requests go on until a choice was made with it (bounded).
        deadline = time.monotonic() + 180
        while decisions().get("engine", 0) < 1:
            assert time.monotonic() < deadline, f"no choice with the engine's model: {decisions()}"
            k, _ = _complete(client, base)
            assert 0 <= k <= 4
        model = parse_page(client.get(f"{server.engine_url}/metrics").text)
        assert model is not None and model.cost["base"] > 0 and len(model.acceptance) == 4
        assert all(0.0 < a < 1.0 for a in model.acceptance)
        # Only greedy requests so far: the engine has measured that sampling class alone, and a
        # greedy request is priced at its rates.
        assert list(model.acceptance_by_class) == ["greedy"] and len(model.acceptance_by_class["greedy"]) == 4
        assert model.rates(0.0) == ("greedy", model.acceptance_by_class["greedy"])
        assert engine_budget(model, batch=1, k_max=4) in range(5)
        k, spec = _complete(client, base)  # idle: priced by the engine's model, within the engine's k
        assert 0 <= k <= 4 and spec["num_spec_tokens"] == 4
        assert decisions()["engine"] >= 2
