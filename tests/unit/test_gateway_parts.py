"""Pure parts of the gateway and the engine launcher: routing choice, windows, argv."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specserve.cli import build_parser
from specserve.engine.process import EngineSpec, engine_command, engine_env
from specserve.errors import APIError
from specserve.gateway.config import KeyLimits
from specserve.gateway.limits import RateLimiter, SlidingWindow
from specserve.gateway.replicas import parse_engine_load, pick_least_loaded

@given(st.lists(st.one_of(st.none(), st.floats(0, 100)), min_size=1, max_size=8), st.integers(0, 20))
def test_pick_least_loaded_returns_a_minimum(loads: list[float | None], start: int) -> None:
    index = pick_least_loaded(loads, start % len(loads))
    present = [v for v in loads if v is not None]
    if not present:
        assert index is None
    else:
        assert index is not None and loads[index] == min(present)


def test_ties_rotate_with_start() -> None:
    assert {pick_least_loaded([1.0, 1.0, 1.0], s) for s in range(3)} == {0, 1, 2}


def test_parse_engine_load_sums_engines_and_ignores_others() -> None:
    page = (
        '# TYPE vllm:num_requests_running gauge\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        '# TYPE vllm:num_requests_waiting gauge\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
        '# TYPE vllm:num_requests_waiting_by_reason gauge\n'
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0\n'
    )
    assert parse_engine_load(page) == (3.0, 4.0)


def test_sliding_window_frees_capacity_after_the_window() -> None:
    w = SlidingWindow(limit=10, window_s=60)
    assert w.try_take(6, now=0) and w.try_take(4, now=10)
    assert not w.try_take(1, now=59)
    assert w.retry_after(now=59) == 1
    assert w.try_take(6, now=60.5)  # the first 6 expired
    assert not w.try_take(5, now=61)


def test_rate_limiter_is_all_or_nothing() -> None:
    limiter = RateLimiter(KeyLimits(requests_per_minute=3, tokens_per_minute=12))
    limiter.admit("k", 8, now=0)
    for _ in range(3):  # over the token limit: refused, and not counted as requests either
        with pytest.raises(APIError) as refused:
            limiter.admit("k", 5, now=1)
        assert refused.value.code == "rate_limit_tokens"
    limiter.admit("k", 2, now=2)  # requests 2 and 3 of 3: the refused ones took no request
    limiter.admit("k", 2, now=3)
    limiter.check("other")  # keys are separate
    with pytest.raises(APIError) as spent:
        limiter.check("k", now=4)
    assert spent.value.code == "rate_limit_requests" and spent.value.headers["Retry-After"] == "56"


def test_rate_limiter_check_refuses_a_spent_key_and_takes_nothing() -> None:
    limiter = RateLimiter(KeyLimits(tokens_per_minute=10))
    limiter.admit("k", 9, now=0)
    limiter.check("k", now=1)  # one token is left
    limiter.check("k", now=1)  # checking took nothing
    limiter.admit("k", 1, now=2)
    with pytest.raises(APIError) as spent:
        limiter.check("k", now=3)
    assert spent.value.code == "rate_limit_tokens" and spent.value.headers["Retry-After"] == "57"
    limiter.check("k", now=60.5)  # the first 9 left the window


def test_engine_command_passes_options_and_extra_args_verbatim() -> None:
    spec = EngineSpec(model="/m", port=9001, served_model_name="demo", device="cpu",
                      speculative_config='{"method":"ngram"}', max_model_len=512,
                      extra_args=("--max-num-seqs", "8"))
    cmd = engine_command(spec, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--speculative-config {\"method\":\"ngram\"}" in joined
    assert "--max-model-len 512" in joined and "--served-model-name demo" in joined
    assert cmd[-2:] == ["--max-num-seqs", "8"]
    assert "--enforce-eager" in cmd
    gpu = engine_command(EngineSpec(model="/m", port=1, served_model_name="m", device="gpu"), python="py")
    assert "--enforce-eager" not in gpu


def test_an_engine_key_adds_the_middleware_and_stays_out_of_argv() -> None:
    spec = EngineSpec(model="/m", port=1, served_model_name="m", api_key="secret-key",
                      extra_args=("--max-num-seqs", "8"))
    cmd = engine_command(spec, python="py")
    assert cmd[cmd.index("--middleware") + 1] == "specserve_vllm.engine_auth.EngineKeyMiddleware"
    assert not any("secret-key" in part for part in cmd) and "secret-key" not in repr(spec)
    assert "--middleware" not in engine_command(EngineSpec(model="/m", port=1, served_model_name="m"))


def test_engine_env_adds_cpu_settings_without_overriding() -> None:
    env = engine_env("cpu", {"VLLM_CPU_KVCACHE_SPACE": "8", "PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8" and env["PATH"] == "/bin"
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_TARGET_DEVICE" not in engine_env("gpu", {})


def test_serve_cli_defaults_and_passthrough() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.engine_port) == (None, "127.0.0.1", 8000, 0)
    args = build_parser().parse_args(
        ["serve", "--model", "/m", "--speculative-config", "{}", "--", "--max-num-seqs", "2"])
    assert args.model == "/m" and args.speculative_config == "{}"
    assert args.engine_args[-2:] == ["--max-num-seqs", "2"]
    gw = build_parser().parse_args(["gateway", "--replica", "http://a:1", "--replica", "http://b:1"])
    assert gw.replica == ["http://a:1", "http://b:1"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway"])


def test_gateway_and_commands_import_without_torch_or_vllm() -> None:
    import subprocess
    import sys

    code = (
        "import sys, specserve.gateway, specserve.engine, specserve.commands.serve, "
        "specserve.commands.gateway; "
        "heavy = sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
