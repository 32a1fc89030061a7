"""A tiny stand-in for vLLM's OpenAI server, run with uvicorn on a free port in a thread.

It speaks enough of the protocol for the gateway tests: /health, /v1/models, /metrics with
``vllm:num_requests_running``, chat/completions (stream and not), /tokenize (one token per word),
and knobs to hold a stream between chunks, delay answers, and count requests that are still
running. With ``spec_tokens`` set, responses carry vLLM's per-request
``metrics.speculative_decoding`` as if each request ran ``spec_steps`` verification steps, each
accepting ``accepted_per_step`` of its ``spec_k`` drafts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from specserve.engine.process import free_port

MODEL = "fake-model"


@dataclass
class FakeState:
    running: int = 0
    requests: list[dict] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    chunks: int = 3
    chunk_delay_s: float = 0.0
    delay_s: float = 0.0
    gate: threading.Event | None = None  # when set: the stream waits for it after the first chunk
    healthy: bool = True
    spec_tokens: int = 0  # the engine's num_speculative_tokens; 0: no speculative metrics
    spec_steps: int = 2
    accepted_per_step: int = 1
    spec_ks: list[int | None] = field(default_factory=list)  # vllm_xargs.spec_k of each request
    tokenize_requests: list[dict] = field(default_factory=list)  # bodies sent to /tokenize
    tokenize_status: int = 200  # anything else: /tokenize fails with it
    tokenize_delay_s: float = 0.0
    max_model_len: int = 2048
    extra_metrics: str = ""  # appended to /metrics (e.g. the engine's exported cost model)
    unary_running: int = 0  # non-streaming requests being answered now
    unary_aborted: int = 0  # non-streaming requests whose client left before the answer
    api_key: str | None = None  # when set: the engine's key middleware guards every route
    tool_call: dict | None = None  # when set: the first streamed chunk is this tool-call delta
    hold_after_done: threading.Event | None = None  # when set: the stream stays open after [DONE] until it is


def word_count(body: dict) -> int:
    """The fake tokenizer: one token per whitespace-separated word of the prompt or messages."""
    if "prompt" in body:
        return len(str(body["prompt"]).split())
    words = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or []]
        words += sum(len(str(part).split()) for part in parts)
    return words


def spec_metrics(state: FakeState, spec_k: object) -> dict:
    """``metrics.speculative_decoding`` for a request capped at ``spec_k`` (``None``: engine default)."""
    k = state.spec_tokens if not isinstance(spec_k, int) else min(spec_k, state.spec_tokens)
    steps = state.spec_steps if k > 0 else 0
    accepted = min(state.accepted_per_step, k)
    histogram = [0] * (state.spec_tokens + 1)
    if steps:
        histogram[accepted] = steps
    return {"speculative_decoding": {
        "mean_acceptance_length": 1.0 + accepted if steps else 1.0,
        "draft_acceptance_rate": accepted / k if steps else 0.0,
        "acceptance_histogram": histogram, "num_spec_steps": steps,
        "num_accepted_draft_tokens": accepted * steps, "num_draft_tokens": k * steps,
        "num_spec_tokens": state.spec_tokens,
        "per_step_drafted": [k] * steps, "per_step_accepted": [accepted] * steps}}


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def build_app(state: FakeState, name: str = "fake") -> FastAPI:
    app = FastAPI()
    tag = {"x-fake-engine": name}
    if state.api_key:
        from specserve_vllm.engine_auth import EngineKeyMiddleware

        app.add_middleware(EngineKeyMiddleware, key=state.api_key)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                         "max_model_len": state.max_model_len}]})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} {float(state.running)}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 0.0\n'
        ) + state.extra_metrics
        return Response(text, media_type="text/plain")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await request.json()
        state.tokenize_requests.append(body)
        if state.tokenize_delay_s:
            await asyncio.sleep(state.tokenize_delay_s)
        if state.tokenize_status != 200:
            return JSONResponse({"error": {"message": "tokenizer failed", "code": state.tokenize_status}},
                                status_code=state.tokenize_status)
        count = word_count(body)
        return JSONResponse({"count": count, "max_model_len": state.max_model_len, "tokens": list(range(count))})

    async def generate(request: Request, kind: str) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.request_ids.append(request.headers.get("x-request-id", ""))
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, status_code=404)
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        usage = {"prompt_tokens": 4, "completion_tokens": state.chunks, "total_tokens": 4 + state.chunks}
        xargs = body.get("vllm_xargs")
        state.spec_ks.append(xargs.get("spec_k") if isinstance(xargs, dict) else None)
        extra = {"metrics": spec_metrics(state, state.spec_ks[-1])} if state.spec_tokens else {}
        if not body.get("stream"):
            if state.gate is not None:  # held until the gate opens or the client leaves
                state.unary_running += 1
                try:
                    while not state.gate.is_set():
                        if await request.is_disconnected():
                            state.unary_aborted += 1
                            return Response(status_code=499)
                        await asyncio.sleep(0.01)
                finally:
                    state.unary_running -= 1
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": "a b c"},
                          "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": "a b c", "finish_reason": "length"}
            return JSONResponse({"id": "x", "object": kind, "model": MODEL, "choices": [choice],
                                 "usage": usage, **extra}, headers=tag)

        async def events() -> AsyncIterator[bytes]:
            state.running += 1
            try:
                for i in range(state.chunks):
                    if await request.is_disconnected():
                        return
                    delta = {"tool_calls": [state.tool_call]} if i == 0 and state.tool_call else {"content": f"t{i} "}
                    yield _sse({"id": "x", "object": "chat.completion.chunk", "model": MODEL,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    if i == 0 and state.gate is not None:
                        while not state.gate.is_set():
                            if await request.is_disconnected():
                                return
                            await asyncio.sleep(0.01)
                    if state.chunk_delay_s:
                        await asyncio.sleep(state.chunk_delay_s)
                yield _sse({"id": "x", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
                            "usage": usage, **extra})
                yield _sse("[DONE]")
                while state.hold_after_done is not None and not state.hold_after_done.is_set():
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(0.01)
            finally:
                state.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream", headers=tag)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "text_completion")

    return app


@contextmanager
def running_fake_engine(state: FakeState | None = None) -> Iterator[tuple[str, FakeState]]:
    """Serve a fake engine on 127.0.0.1; yields its base URL and state; stops it afterwards."""
    state = state or FakeState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake engine did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@asynccontextmanager
async def in_process_gateway(config: Any) -> AsyncIterator[tuple[Any, FastAPI]]:
    """The gateway app for ``config`` (lifespan started, own metrics registry) and an
    ``httpx.AsyncClient`` that calls it in process: ``(client, app)``."""
    import httpx
    from prometheus_client import CollectorRegistry

    from specserve.gateway import create_app

    app = create_app(config, registry=CollectorRegistry())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw",
                                     timeout=20) as client:
            yield client, app


@contextmanager
def gateway_over_fake_engine() -> Iterator[tuple[asyncio.AbstractEventLoop, "object"]]:
    """The gateway app (lifespan started) in front of a fake engine: ``(loop, httpx.AsyncClient)``.

    The app imports xgrammar (and numpy) in a background thread at start; Hypothesis looks at
    ``sys.modules["numpy"]`` while generating, which races with a half-done import, so it is
    imported here first.
    """
    import httpx
    from prometheus_client import CollectorRegistry

    from specserve.gateway import GatewayConfig, create_app
    from specserve.structured.compile import load_xgrammar

    load_xgrammar()
    with running_fake_engine() as (url, _):
        app = create_app(GatewayConfig(replicas=[url]), registry=CollectorRegistry())
        loop = asyncio.new_event_loop()
        lifespan = app.router.lifespan_context(app)
        loop.run_until_complete(lifespan.__aenter__())
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", timeout=30)
        try:
            yield loop, http
        finally:
            loop.run_until_complete(http.aclose())
            loop.run_until_complete(lifespan.__aexit__(None, None, None))
            loop.close()


def main() -> None:
    """Run a fake engine in this process (the fault tests SIGKILL it): PORT NAME CHUNKS CHUNK_DELAY DELAY."""
    import sys

    port, name, chunks, chunk_delay, delay = sys.argv[1:6]
    state = FakeState(chunks=int(chunks), chunk_delay_s=float(chunk_delay), delay_s=float(delay))
    uvicorn.run(build_app(state, name), host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
