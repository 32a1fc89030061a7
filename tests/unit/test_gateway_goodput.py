"""The goodput speculation-length controller, the speculation fields on the wire, and the gateway
choosing ``spec_k`` and counting per-request acceptance against the fake engine."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specserve.gateway import GatewayConfig
from specserve.gateway.goodput import (
    AcceptanceEstimate, GoodputController, GoodputSettings, SpecStats, StepTimeModel, best_k,
    expected_tokens, goodput,
)
from specserve.gateway.proxy import usage_event_from_sse_tail, usage_from_sse_tail
from specserve.gateway.spec_io import client_spec_k, spec_stats, with_spec_k

from support.gateway_fake_engine import MODEL, FakeState, running_fake_engine
from support.gateway_fake_engine import in_process_gateway as gateway

A, B = 0.02, 0.0005  # the default step-time model: 20 ms a step, 0.5 ms per verified token


# -- the pure controller ----------------------------------------------------------------------
def test_idle_and_accurate_drafter_speculates_k_max() -> None:
    assert best_k(0.9, batch=1, a=A, b=B, k_max=4) == 4
    assert best_k(0.9, batch=1, a=A, b=B, k_max=7) == 7


@pytest.mark.parametrize("alpha, batch", [(0.9, 1000), (0.5, 300), (0.02, 1), (0.0, 1)])
def test_heavy_load_or_poor_drafter_speculates_nothing(alpha: float, batch: float) -> None:
    assert best_k(alpha, batch=batch, a=A, b=B, k_max=4) == 0


def test_k_falls_with_load_and_rises_with_acceptance() -> None:
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    alphas = [0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]
    for alpha in alphas:
        ks = [best_k(alpha, batch, A, B, k_max=6) for batch in batches]
        assert ks == sorted(ks, reverse=True), (alpha, ks)
    for batch in batches:
        ks = [best_k(alpha, batch, A, B, k_max=6) for alpha in alphas]
        assert ks == sorted(ks), (batch, ks)
    # A slope of 0 (verifying more tokens costs nothing): always k_max once anything is accepted.
    assert best_k(0.1, batch=10_000, a=A, b=0.0, k_max=5) == 5


def test_chosen_k_maximises_goodput() -> None:
    for alpha in (0.3, 0.6, 0.85):
        for batch in (1, 16, 64):
            k = best_k(alpha, batch, A, B, k_max=8)
            assert goodput(alpha, k, batch, A, B) == max(goodput(alpha, j, batch, A, B) for j in range(9))


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(0.7, 0) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)


def test_acceptance_estimate_moves_towards_observations() -> None:
    est = AcceptanceEstimate(prior=0.5)
    for _ in range(50):
        est.observe(9, 10)
    assert est.alpha == pytest.approx(0.9, abs=0.02)
    for _ in range(100):
        est.observe(1, 10)
    assert est.alpha == pytest.approx(0.1, abs=0.03)
    est.observe(0, 0)  # no drafts: nothing learnt
    assert est.alpha == pytest.approx(0.1, abs=0.03)


def test_step_time_model_fits_line_and_keeps_prior_slope_without_spread() -> None:
    fit = StepTimeModel(a0=0.02, b0=0.0005)
    for x in (4, 16, 64, 128) * 50:
        fit.observe(x, 0.005 + 0.001 * x)
    a, b = fit.params()
    assert a == pytest.approx(0.005, abs=0.002) and b == pytest.approx(0.001, rel=0.1)
    flat = StepTimeModel(a0=0.02, b0=0.0005)
    for _ in range(200):
        flat.observe(2, 0.03)  # only one batch size: the slope stays near its prior
    a, b = flat.params()
    assert b == pytest.approx(0.0005, rel=0.3) and a + 2 * b == pytest.approx(0.03, rel=0.05)


def test_geometric_trials_from_histogram() -> None:
    # 4 steps of 3 drafts: accepted 3, 3, 1, 0 -> 7 successes, 2 rejections.
    stats = SpecStats(accepted=7, drafted=12, steps=4, spec_tokens=4, mean_acceptance_length=2.75,
                      histogram=(1, 1, 0, 2, 0))
    assert stats.trials() == (7, 9)


def test_controller_learns_acceptance_and_engine_k() -> None:
    ctl = GoodputController(GoodputSettings(alpha_prior=0.5, probe_every=0))
    assert ctl.k_max(MODEL) == 4
    good = SpecStats(accepted=60, drafted=60, steps=10, spec_tokens=6, mean_acceptance_length=7.0,
                     histogram=(0, 0, 0, 0, 0, 0, 10))
    for _ in range(20):
        ctl.observe(MODEL, good)
    assert ctl.k_max(MODEL) == 6 and ctl.alpha(MODEL) > 0.95
    assert ctl.choose(MODEL, batch=1).k == 6
    bad = SpecStats(accepted=0, drafted=60, steps=10, spec_tokens=6, mean_acceptance_length=1.0,
                    histogram=(10, 0, 0, 0, 0, 0, 0))
    for _ in range(100):
        ctl.observe(MODEL, bad)
    assert ctl.choose(MODEL, batch=8).k == 0
    assert GoodputController(GoodputSettings(k_max=2)).k_max(MODEL) == 2


def test_controller_probes_when_acceptance_alone_holds_k_at_zero() -> None:
    ctl = GoodputController(GoodputSettings(alpha_prior=0.0, probe_every=3))
    assert [ctl.choose(MODEL, batch=8).k for _ in range(6)] == [0, 0, 1, 0, 0, 1]


# -- the wire -----------------------------------------------------------------------------------
VLLM_SPEC = {"mean_acceptance_length": 2.5, "draft_acceptance_rate": 0.375,
             "acceptance_histogram": [1, 1, 0, 2, 0], "num_spec_steps": 4,
             "num_accepted_draft_tokens": 7, "num_draft_tokens": 16, "num_spec_tokens": 4}


def test_spec_stats_from_unary_body() -> None:
    body = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 12},
            "metrics": {"speculative_decoding": VLLM_SPEC}}
    stats = spec_stats(json.loads(json.dumps(body)))
    assert stats == SpecStats(accepted=7, drafted=16, steps=4, spec_tokens=4, mean_acceptance_length=2.5,
                              histogram=(1, 1, 0, 2, 0))
    assert stats.trials() == (7, 11)  # 4 drafts a step, every step rejected one
    assert spec_stats({"metrics": None}) is None
    assert spec_stats({"metrics": {"speculative_decoding": {"num_draft_tokens": "x"}}}) is None


def test_spec_stats_from_sse_tail() -> None:
    # vLLM's last events: a content chunk, the usage chunk with the metrics, [DONE].
    final = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 5, "total_tokens": 17, "completion_tokens": 12},
             "metrics": {"speculative_decoding": VLLM_SPEC}}
    tail = (b'ng"},"finish_reason":"length"}]}\n\n'
            + b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n")
    event = usage_event_from_sse_tail(tail)
    assert event is not None and spec_stats(event) is not None
    assert spec_stats(event).accepted == 7  # type: ignore[union-attr]
    assert usage_from_sse_tail(tail) == (5, 12)
    assert usage_event_from_sse_tail(b"data: [DONE]\n\n") is None


def test_spec_k_into_request_bodies() -> None:
    assert json.loads(with_spec_k(b'{"model":"m","max_tokens":3}', 2, has_xargs=False) or b"") == {
        "vllm_xargs": {"spec_k": 2}, "model": "m", "max_tokens": 3}
    merged = with_spec_k(b'{"model":"m","vllm_xargs":{"x":"y"}}', 0, has_xargs=True)
    assert json.loads(merged or b"")["vllm_xargs"] == {"x": "y", "spec_k": 0}
    assert with_spec_k(b"{ }", 1, has_xargs=False) is None
    assert client_spec_k({"vllm_xargs": {"spec_k": 0}}) == (True, 0)
    assert client_spec_k({"vllm_xargs": {"spec_k": True}}) == (True, None)
    assert client_spec_k({"vllm_xargs": {"other": 1}}) == (False, None)


# -- the gateway against the fake engine -----------------------------------------------------------
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture()
def fake() -> Iterator[tuple[str, FakeState]]:
    with running_fake_engine(FakeState(spec_tokens=4, accepted_per_step=4, chunks=9)) as pair:
        yield pair


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_goodput_policy_sets_spec_k_and_respects_the_clients(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> str:
        async with gateway(GatewayConfig(replicas=[url], spec_policy="goodput")) as (client, _):
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-specserve-spec-k"] == "4"
            # what the request got: 9 tokens, 2 steps of 4 drafts each accepting all 4
            assert (r.headers["x-specserve-spec-k-mean"], r.headers["x-specserve-spec-k-max"]) == ("4", "4")
            assert state.requests[-1]["vllm_xargs"] == {"spec_k": 4}
            assert state.requests[-1]["messages"] == CHAT["messages"]
            s = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True,
                                                          "stream_options": {"include_usage": True}})
            assert s.status_code == 200 and s.headers["x-specserve-spec-k"] == "4"
            assert state.spec_ks[-1] == 4 and "[DONE]" in s.text
            # the client's own spec_k goes through as sent, alone or beside other xargs
            for xargs in ({"spec_k": 1}, {"spec_k": 0, "other": "v"}):
                r = await client.post("/v1/chat/completions", json={**CHAT, "vllm_xargs": xargs})
                assert r.status_code == 200 and state.requests[-1]["vllm_xargs"] == xargs
                assert r.headers["x-specserve-spec-k"] == str(xargs["spec_k"])
                # spec_k=1: 9 tokens, 2 steps accepting their 1 draft, so 6 decode steps, 2 drafts
                assert (r.headers["x-specserve-spec-k-mean"], r.headers["x-specserve-spec-k-max"]) == (
                    ("0.333", "1") if xargs["spec_k"] == 1 else ("0", "0"))
            r = await client.post("/v1/chat/completions", json={**CHAT, "vllm_xargs": {"other": "v"}})
            assert state.requests[-1]["vllm_xargs"] == {"other": "v", "spec_k": 4}
            return (await client.get("/metrics")).text

    found = samples(asyncio.run(main()))
    by_model = (("model", MODEL), ("replica", "0"))  # replicas are labelled by index
    # 5 responses with metrics: 3 at k=4 (2 steps x 4 drafts, all accepted), 1 at k=1, 1 at k=0.
    assert found[("specserve_spec_draft_tokens_total", by_model)] == 3 * 8 + 2
    assert found[("specserve_spec_accepted_tokens_total", by_model)] == 3 * 8 + 2
    assert found[("specserve_spec_acceptance_length_count", (("model", MODEL),))] == 4
    assert found[("specserve_spec_k_count", (("model", MODEL), ("source", "goodput")))] == 3
    assert found[("specserve_spec_k_count", (("model", MODEL), ("source", "client")))] == 2
    assert found[("specserve_spec_k_sum", (("model", MODEL), ("source", "client")))] == 1
    assert found[("specserve_spec_k_used_count", (("model", MODEL),))] == 5
    assert found[("specserve_spec_k_used_sum", (("model", MODEL),))] == pytest.approx(3 * 4 + 0.333)
    assert found[("specserve_spec_alpha_ratio", (("model", MODEL),))] > 0.8  # prior 0.5, 26 of 26 accepted
    assert found[("specserve_spec_batch_requests", (("model", MODEL),))] in (1, 2)  # 2: scraped mid-stream
    assert found[("specserve_spec_step_base_seconds", (("model", MODEL),))] > 0


def test_goodput_policy_sends_zero_under_load(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    state.running = 2000  # the scraped vllm:num_requests_running

    async def main() -> None:
        async with gateway(GatewayConfig(replicas=[url], spec_policy="goodput")) as (client, _):
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.headers["x-specserve-spec-k"] == "0" and state.spec_ks[-1] == 0

    asyncio.run(main())


ENGINE_MODEL = "\n".join([
    "# TYPE specserve_engine_step_cost_ms gauge",
    *(f'specserve_engine_step_cost_ms{{term="{t}"}} {v}' for t, v in (
        ("base", 8.0), ("per_token", 0.5), ("per_row", 0.0), ("context", 0.0), ("spec", 1.0),
        ("spec_row", 0.0), ("draft", 0.5), ("draft_token", 0.05))),
    "# TYPE specserve_engine_acceptance_estimate_ratio gauge",
    *(f'specserve_engine_acceptance_estimate_ratio{{position="{j}"}} {a}'
      for j, a in enumerate((0.8, 0.7, 0.6, 0.5), start=1)),
]) + "\n"


@pytest.mark.parametrize(("running", "k"), [(0, "4"), (3, "3"), (15, "1"), (63, "0")])
def test_goodput_policy_prices_requests_with_the_engines_exported_model(
        fake: tuple[str, FakeState], running: int, k: str) -> None:
    """The budget is the engine's own plan for a batch of its running requests plus this one
    (``engine_model.engine_budget``: 4, 3, 1, 0 at 1, 4, 16, 64 rows for this model)."""
    url, state = fake
    state.running, state.extra_metrics = running, ENGINE_MODEL

    async def main() -> str:
        async with gateway(GatewayConfig(replicas=[url], spec_policy="goodput")) as (client, _):
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-specserve-spec-k"] == k
            assert state.spec_ks[-1] == int(k)
            return (await client.get("/metrics")).text

    found = samples(asyncio.run(main()))
    assert found[("specserve_spec_decisions_total", (("cost_model", "engine"), ("model", MODEL)))] == 1


def test_goodput_policy_falls_back_to_its_own_fit_without_an_exported_model(fake: tuple[str, FakeState]) -> None:
    url, _ = fake

    async def main() -> str:
        async with gateway(GatewayConfig(replicas=[url], spec_policy="goodput")) as (client, _):
            await client.post("/v1/chat/completions", json=CHAT)
            return (await client.get("/metrics")).text

    found = samples(asyncio.run(main()))
    assert found[("specserve_spec_decisions_total", (("cost_model", "gateway"), ("model", MODEL)))] == 1


def test_fixed_policy_leaves_requests_alone_and_still_counts(fake: tuple[str, FakeState]) -> None:
    url, state = fake

    async def main() -> str:
        async with gateway(GatewayConfig(replicas=[url])) as (client, _):
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert "x-specserve-spec-k" not in r.headers and "vllm_xargs" not in state.requests[-1]
            await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            return (await client.get("/metrics")).text

    found = samples(asyncio.run(main()))
    assert found[("specserve_spec_draft_tokens_total", (("model", MODEL), ("replica", "0")))] == 16


def test_cli_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from specserve.commands.gateway import add_arguments, gateway_config

    monkeypatch.setenv("SPECSERVE_SPEC_POLICY", "goodput")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--replica", "http://e:8000", "--spec-k-max", "3"])
    cfg = gateway_config(args, args.replica)
    assert cfg.spec_policy == "goodput" and cfg.goodput_settings().k_max == 3
    args = parser.parse_args(["--replica", "http://e:8000", "--spec-policy", "fixed"])
    assert gateway_config(args, args.replica).spec_policy == "fixed"
    monkeypatch.delenv("SPECSERVE_SPEC_POLICY")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--replica", "http://e:8000"]).spec_policy == "fixed"


def test_step_cost_start_values_follow_the_device() -> None:
    from specserve.commands.gateway import STEP_COST_MS, add_arguments, gateway_config, step_costs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--replica", "http://e:8000"])
    assert gateway_config(args, args.replica).spec_step_base_ms == STEP_COST_MS["gpu"][0]
    cpu = gateway_config(args, args.replica, device="cpu")
    assert (cpu.spec_step_base_ms, cpu.spec_step_token_ms) == STEP_COST_MS["cpu"]
    given = parser.parse_args(["--replica", "http://e:8000", "--spec-step-token-ms", "0.1"])
    assert step_costs(given, "cpu") == (STEP_COST_MS["cpu"][0], 0.1)


SLOW_ENGINE_MODEL = ENGINE_MODEL.replace('term="base"} 8.0', 'term="base"} 40.0').replace(
    'position="1"} 0.8', 'position="1"} 0.1')


@pytest.mark.parametrize("routing", ["least-loaded", "goodput"])
def test_goodput_routing_sends_a_request_where_it_adds_most(routing: str) -> None:
    """Replica "fast" runs 2 requests at 8 ms a step with good acceptance; replica "slow" runs 1 at
    40 ms with poor acceptance. Least-loaded picks "slow"; goodput routing picks "fast", where one
    more request adds more predicted tokens per ms (both engines export their cost models)."""
    from specserve.gateway.engine_model import marginal_goodput, parse_page

    fast_model, slow_model = parse_page(ENGINE_MODEL), parse_page(SLOW_ENGINE_MODEL)
    assert fast_model is not None and slow_model is not None
    assert marginal_goodput(fast_model, 2, 4) > marginal_goodput(slow_model, 1, 4)  # what the test relies on
    fast_state = FakeState(spec_tokens=4, accepted_per_step=4, chunks=9, running=2, extra_metrics=ENGINE_MODEL)
    slow_state = FakeState(spec_tokens=4, accepted_per_step=4, chunks=9, running=1,
                           extra_metrics=SLOW_ENGINE_MODEL)
    with running_fake_engine(fast_state) as (fast, _), running_fake_engine(slow_state) as (slow, _):
        async def main() -> None:
            config = GatewayConfig(replicas=[fast, slow], spec_policy="goodput", routing=routing)
            async with gateway(config) as (client, _):
                for stream in (False, True):
                    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                    assert r.status_code == 200

        asyncio.run(main())
    chosen, other = (fast_state, slow_state) if routing == "goodput" else (slow_state, fast_state)
    assert len(chosen.requests) == 2 and not other.requests


def test_goodput_routing_falls_back_to_least_loaded_without_exported_models() -> None:
    exporting = FakeState(spec_tokens=4, accepted_per_step=4, chunks=9, running=2, extra_metrics=ENGINE_MODEL)
    plain = FakeState(spec_tokens=4, accepted_per_step=4, chunks=9, running=1)  # exports nothing
    with running_fake_engine(exporting) as (a, _), running_fake_engine(plain) as (b, _):
        async def main() -> None:
            async with gateway(GatewayConfig(replicas=[a, b], spec_policy="goodput", routing="goodput")) as (client, _):
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

        asyncio.run(main())
    assert len(plain.requests) == 1 and not exporting.requests  # the least loaded
