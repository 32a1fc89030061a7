"""``specserve serve`` end to end: the real engine on CPU, the gateway, the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.specserve_process import ENGINE_KEY, MODEL_NAME, ServeProcess, running_gateway, running_specserve, stop

PROMPT = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
# A fixed number of tokens whatever the model prefers (vLLM extra parameter).
FULL = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with running_specserve(demo_model_dir, log_dir=tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=16, temperature=0,
                                       extra_body=FULL)
    text = r.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=16, temperature=0,
                                           extra_body=FULL)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=PROMPT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=FULL,
    )
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 1  # tokens arrived as separate events
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="def add(a, b):\n", max_tokens=12, temperature=0,
                                  extra_body=FULL)
    assert r.choices[0].text.strip()
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_errors_reach_the_client_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=4, temperature=5)
    assert bad.value.body["param"] == "temperature"


def test_a_prompt_longer_than_the_context_is_an_openai_400(client: openai.OpenAI) -> None:
    long_text = "word " * 2000  # far more tokens than --max-model-len 512
    calls = [
        ("messages", lambda stream: client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": long_text}], max_tokens=4, stream=stream)),
        ("prompt", lambda stream: client.completions.create(
            model=MODEL_NAME, prompt=long_text, max_tokens=4, stream=stream)),
    ]
    for param, call in calls:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as too_long:
                call(stream)
            body = too_long.value.body
            assert set(body) == {"message", "type", "param", "code"}, body
            assert (body["param"], body["code"]) == (param, "context_length_exceeded"), body
            assert "maximum context length" in body["message"]


def test_max_prompt_tokens_counts_as_the_engine_does(server: ServeProcess, tmp_path: Path) -> None:
    # A second gateway, with the cap, in front of the same engine: exactly at the cap passes, one
    # word more is refused before the engine, chat template included.
    with httpx.Client(trust_env=False, timeout=60) as http:
        counted = http.post(f"{server.engine_url}/tokenize", json={"model": MODEL_NAME, "messages": PROMPT},
                            headers={"authorization": f"Bearer {ENGINE_KEY}"})
        counted.raise_for_status()
    cap = counted.json()["count"]
    longer = [{"role": "user", "content": PROMPT[0]["content"] + " Then subtract them."}]
    with running_gateway([server.engine_url], ["--max-prompt-tokens", str(cap)], log_dir=tmp_path) as url:
        capped = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        ok = capped.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=2)
        assert ok.usage is not None and ok.usage.prompt_tokens == cap
        calls = [
            ("messages", lambda: capped.chat.completions.create(model=MODEL_NAME, messages=longer, max_tokens=2)),
            ("prompt", lambda: capped.completions.create(model=MODEL_NAME, prompt=[[1] * (cap + 1)], max_tokens=2)),
        ]
        for param, call in calls:
            with pytest.raises(openai.BadRequestError) as refused:
                call()
            body = refused.value.body
            assert (refused.value.code, refused.value.param) == ("context_length_exceeded", param), body
            assert isinstance(body, dict) and f"at most {cap} are accepted" in body["message"], body


def test_openai_features_through_the_gateway(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=8, n=2,
                                         temperature=0.8, seed=1)
    assert sorted(c.index for c in two.choices) == [0, 1]
    seeded = [
        client.completions.create(model=MODEL_NAME, prompt="def ", max_tokens=12, temperature=1.0,
                                  seed=1234).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]  # seeds are reproducible at temperature > 0
    plain = client.completions.create(model=MODEL_NAME, prompt="def ", max_tokens=12, temperature=0,
                                      extra_body=FULL)
    text = plain.choices[0].text
    assert len(text) > 2
    cut = client.completions.create(model=MODEL_NAME, prompt="def ", max_tokens=12, temperature=0,
                                    stop=[text[1:3]], extra_body=FULL)
    assert cut.choices[0].finish_reason == "stop"
    assert text[1:3] not in cut.choices[0].text and text.startswith(cut.choices[0].text)
    lp = client.chat.completions.create(model=MODEL_NAME, messages=PROMPT, max_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_async_client_streams_concurrently(server: ServeProcess) -> None:
    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            stream = await aclient.completions.create(model=MODEL_NAME, prompt=f"x = {i}\n", max_tokens=8,
                                                      temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(4)))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert len(texts) == 4 and all(texts)


def test_health_ready_and_metrics(server: ServeProcess) -> None:
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=10) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["specserve_gateway_requests"].samples
                if s.name.endswith("_total") and s.labels["route"] == "/v1/chat/completions"
                and s.labels["status"] == "200"]
    assert requests and requests[0].value >= 3
    assert "specserve_gateway_request_duration_seconds" in families
    ttft = [s for s in families["specserve_gateway_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")]
    assert ttft and ttft[0].value >= 1


def _engine_metric(server: ServeProcess, name: str) -> float:
    text = httpx.get(f"{server.engine_url}/metrics", timeout=10).text
    return sum(
        s.value for f in text_string_to_metric_families(text) if f.name == name
        for s in f.samples if s.name in (name, f"{name}_total")
    )


def _long_stream(server: ServeProcess, max_tokens: int, n: int = 1) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": "import", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "n": n, "temperature": 1.0 if n > 1 else 0.0, "seed": 0}
    client = httpx.Client(base_url=server.base_url, trust_env=False, timeout=120)
    request = client.build_request("POST", "/v1/completions", json=body)
    return client.send(request, stream=True)


def _wait_engine_metric(server: ServeProcess, name: str, check: Callable[[float], bool], what: str,
                        timeout_s: float = 120.0) -> float:
    """Poll the engine's ``name`` until ``check`` holds (bounded); fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    value = _engine_metric(server, name)
    while not check(value):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s ({name} = {value})"
        time.sleep(0.05)
        value = _engine_metric(server, name)
    return value


def _engine_group(server: ServeProcess) -> int:
    """The engine's process group (its own session: the group id is the engine's pid)."""
    for child in psutil.Process(server.proc.pid).children():
        if os.getpgid(child.pid) == child.pid:
            return child.pid
    raise AssertionError(f"no engine process group under serve: {server.descendants()}")


def test_client_disconnect_frees_the_engine_slot(server: ServeProcess) -> None:
    n, max_tokens = 4, 480
    generated_before = _engine_metric(server, "vllm:generation_tokens")
    group = _engine_group(server)
    response = _long_stream(server, max_tokens=max_tokens, n=n)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: {"))
    # The client goes away mid-stream. The engine is frozen meanwhile, so it cannot run the request
    # to its end before the disconnect reaches it, however fast the machine.
    os.killpg(group, signal.SIGSTOP)
    try:
        response.close()
    finally:
        os.killpg(group, signal.SIGCONT)
    _wait_engine_metric(server, "vllm:num_requests_running", lambda v: v == 0.0, "the engine slot freed")
    # Aborted, not run to completion: far fewer tokens than n * max_tokens were generated.
    generated = _engine_metric(server, "vllm:generation_tokens") - generated_before
    assert 0 < generated < n * max_tokens, generated


def test_sigterm_drains_the_open_stream_then_stops_everything(server: ServeProcess) -> None:
    children = server.descendants()
    assert children, "the engine should run as a child process"
    response = _long_stream(server, max_tokens=120)
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: {"))
    assert first
    server.proc.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line.startswith("data: ")]
    response.close()
    assert rest[-1] == "data: [DONE]"
    finals = [json.loads(line[6:]) for line in rest[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    # A second SIGTERM while the engine is being stopped (as a supervisor may send) still ends in
    # a clean exit.
    deadline = time.monotonic() + 60
    while "stopping engine" not in server.log_path.read_text(errors="replace"):
        assert server.proc.poll() is None and time.monotonic() < deadline, "no engine stop logged"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    assert stop(server, timeout_s=90) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=2)
