"""A fake vLLM OpenAI server for the gateway benchmark: fixed-pace token streams, no model.

It answers what the gateway needs (``/health``, ``/v1/models``, ``/metrics`` with vLLM's running and
waiting gauges, ``/v1/completions`` and ``/v1/chat/completions``, streamed or not) and writes one
SSE event per token every ``--token-interval`` seconds on a fixed schedule, like the decode steps of
an engine on its own accelerator (a late wake-up on a busy CPU does not push the later tokens back).
The first token comes one interval after the request (prefill). Built on aiohttp's server so that
the fake engine itself costs little CPU next to the gateway being measured.

Example:
    python -m specserve.bench.fake_engine --port 8001 --token-interval 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from aiohttp import web

MODEL = "fake-model"
_RUNNING: web.AppKey[list[int]] = web.AppKey("running", list[int])
_INTERVAL: web.AppKey[float] = web.AppKey("interval", float)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event.

    Example:
        >>> sse("[DONE]")
        b'data: [DONE]\\n\\n'
    """
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


def token_event(kind: str, index: int) -> bytes:
    """The SSE event of token ``index`` in a completion (``kind`` "chat" or "text")."""
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f"t{index} "}, "logprobs": None,
                                  "finish_reason": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": f"t{index} ", "logprobs": None, "finish_reason": None}
        obj = "text_completion"
    return sse({"id": "cmpl-fake", "object": obj, "created": 0, "model": MODEL, "choices": [choice]})


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}


async def _health(_: web.Request) -> web.Response:
    return web.Response(status=200)


async def _models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def _metrics(request: web.Request) -> web.Response:
    running = float(request.app[_RUNNING][0])
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} {running}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 0.0\n'
    )
    return web.Response(text=text, content_type="text/plain")


async def _stream(request: web.Request, kind: str, tokens: int, interval: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(tokens):
        # Steps on a fixed schedule (as a GPU's would be): a late wake-up does not delay the rest.
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - loop.time()))
        await response.write(token_event(kind, i))
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    await response.write(sse({"id": "cmpl-fake", "object": obj, "created": 0, "model": MODEL,
                              "choices": [], "usage": usage(tokens)}) + sse("[DONE]"))
    await response.write_eof()
    return response


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"message": "bad JSON", "type": "BadRequestError",
                                            "param": None, "code": 400}}, status=400)
    if body.get("model") != MODEL:
        return web.json_response({"error": {"message": "no such model", "type": "NotFoundError",
                                            "param": "model", "code": 404}}, status=404)
    tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    interval = request.app[_INTERVAL]
    running = request.app[_RUNNING]
    running[0] += 1
    try:
        if body.get("stream"):
            return await _stream(request, kind, tokens, interval)
        await asyncio.sleep(interval * tokens)
        text = "".join(f"t{i} " for i in range(tokens))
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if kind == "chat" else {"index": 0, "text": text, "finish_reason": "length"}
        )
        return web.json_response({"id": "cmpl-fake", "object": kind, "model": MODEL,
                                  "choices": [choice], "usage": usage(tokens)})
    finally:
        running[0] -= 1


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "text")


def build_app(token_interval_s: float) -> web.Application:
    """The fake engine's aiohttp application."""
    app = web.Application()
    app[_RUNNING] = [0]
    app[_INTERVAL] = token_interval_s
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    return app


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-interval", type=float, default=0.02, help="seconds between tokens")
    args = parser.parse_args(argv)
    web.run_app(build_app(args.token_interval), host=args.host, port=args.port, print=None,
                access_log=None, handle_signals=True, loop=new_loop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
