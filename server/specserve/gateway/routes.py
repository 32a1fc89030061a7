"""HTTP routes of the gateway: the proxied OpenAI routes and /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from specserve.errors import APIError
from specserve.gateway.limits import AdmissionQueue, charged_tokens, check_api_key, engine_max_tokens
from specserve.gateway.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    unsupported_param,
)
from specserve.gateway.prompt_tokens import Route, TokenizeFailed, completion_prompts, count_prompts
from specserve.gateway.proxy import Outcome
from specserve.gateway.request_body import ForwardBody
from specserve.gateway.speculation import SPEC_K_HEADER, SPEC_K_MAX_HEADER, SPEC_K_MEAN_HEADER
from specserve.gateway.state import Gateway
from specserve.gateway.tools import Call, ToolRequest, failures, tool_request
from specserve.structured.engine_grammar import CHECKED_HEADER, served_reading
from specserve.structured.request import asks_strict, mark_strict, normalize_legacy
from specserve.structured.tools import asks_strict_tool, mark_strict_tools

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")

# Request fields that can be large and that no pre-check reads.
_BULK_FIELDS = frozenset({"messages", "prompt", "tools"})


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


@router.get("/health")
async def health() -> Response:
    """The gateway process is alive (engines may not be)."""
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 when at least one engine replica is healthy, else 503."""
    gw = _gateway(request)
    replicas = {r.label: r.healthy for r in gw.pool.replicas.values()}
    if not gw.pool.ready:
        raise APIError(503, "No engine replica is ready.", code="not_ready", headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "replicas": replicas})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = _gateway(request)
    gw.metrics.queue_depth.set(gw.queue.waiting)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _authenticate(gw: Gateway, request: Request) -> str:
    """The rate-limit key: the API key when auth is on, else the client address. The middleware
    checked the key before the body was read; this only reads its answer."""
    key = request.scope.get("state", {}).get("client_key")
    if key is not None:
        return str(key)
    if gw.config.api_keys:  # not through the middleware: check here
        return check_api_key(request.headers.get("authorization"), gw.config.api_keys)
    return request.client.host if request.client else "anonymous"


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    _authenticate(gw, request)
    outcome = Outcome()
    headers = gw.proxy.forward_headers(request.scope["headers"])
    return await gw.proxy.unary("GET", "/v1/models", None, headers, outcome)


async def _generate(
    request: Request, path: str, route: Route, parsed: ChatCompletionRequest | CompletionRequest
) -> Response:
    gw = _gateway(request)
    cfg = gw.config
    key = _authenticate(gw, request)
    # The JSON the framework parsed for ``parsed`` (cached on the request: not parsed again).
    forward = ForwardBody(await request.body(), await request.json())
    # The checks below read top-level fields only: the prompt and the messages (the bulk of a large
    # request) are not dumped again.
    body = parsed.model_dump(exclude_unset=True, exclude=_BULK_FIELDS)
    bad = unsupported_param(body)
    if bad is not None:
        raise APIError(400, f"The parameter '{bad}' is not supported by this server.", param=bad,
                       code="unsupported_parameter", reason="unsupported_param")
    max_tokens = parsed.requested_tokens()
    if cfg.max_tokens_cap and max_tokens is not None and max_tokens > cfg.max_tokens_cap:
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise APIError(400, f"'{param}' must be at most {cfg.max_tokens_cap}.", param=param,
                       code="max_tokens_exceeded", reason="max_tokens")
    prompt_chars = parsed.prompt_chars()
    if cfg.max_prompt_chars and prompt_chars > cfg.max_prompt_chars:
        param = "messages" if route == "chat" else "prompt"
        raise APIError(400, f"The prompt is too long: at most {cfg.max_prompt_chars} characters.",
                       param=param, code="context_length_exceeded", reason="prompt_too_long")
    models = gw.pool.models()
    if not models:
        raise APIError(503, "No engine replica is ready.", code="engine_unavailable",
                       headers={"Retry-After": "1"})
    if parsed.model not in models:
        raise APIError(404, f"The model '{parsed.model}' does not exist.", param="model",
                       code="model_not_found")
    request.state.model = parsed.model
    checked = body
    if isinstance(parsed, ChatCompletionRequest) and (parsed.tools is not None or parsed.tool_choice is not None):
        # Tools are left out of ``body`` above; their schemas are checked like response_format.
        checked = {**body, **parsed.model_dump(include={"tools"}, exclude_unset=True)}
    compiled = await gw.schema_check.aprecheck(checked, route, owner=key)
    tools = tool_request(checked) if checked is not body else None
    if tools is not None:
        gw.metrics.child(gw.metrics.tool_requests, tools.kind).inc()
    if normalize_legacy(body) is not body:
        # Legacy guided_* fields: vLLM 0.32 would silently ignore them.
        forward.apply(normalize_legacy)
    if asks_strict(body):
        # strict: true reaches the engine as a keyword of the schema (vLLM drops the flag).
        forward.apply(mark_strict)
    if tools is not None and asks_strict_tool(checked):
        # A forced tool with strict: true gets the strict reading of its parameters, the same way.
        forward.apply(mark_strict_tools)
    prompt_tokens = largest_prompt = None
    if cfg.max_prompt_tokens:
        if gw.limiter.enabled:
            gw.limiter.check(key)  # a key with nothing left is refused before its prompt is counted
        counted = await _check_prompt_tokens(gw, route, forward.data, request.state.request_id)
        if counted is not None:
            prompt_tokens, largest_prompt = counted
    # What the engine will generate per choice, also when max_tokens is left out (chat: the rest
    # of the context); over the cap, the request is sent with max_tokens set to the cap.
    allowed = engine_max_tokens(route, max_tokens, "max_tokens" in body and max_tokens is None,
                                gw.pool.max_model_len(parsed.model),
                                largest_prompt if route == "chat" else None)
    if cfg.max_tokens_cap and max_tokens is None and (allowed is None or allowed > cfg.max_tokens_cap):
        allowed = cfg.max_tokens_cap
        forward.set("max_tokens", allowed)
    if gw.limiter.enabled:
        # ``body`` leaves the prompt out (see above): read it from the parsed request.
        prompts = len(completion_prompts(parsed.prompt)) if isinstance(parsed, CompletionRequest) else 1
        gw.limiter.admit(key, charged_tokens(prompt_chars, allowed, parsed.n, prompt_tokens, prompts))
    plan = gw.spec.prepare(parsed.model, body, forward)
    body_bytes = forward.encode()
    await take_slot(request, gw.queue)
    started = request.state.started if hasattr(request.state, "started") else time.perf_counter()
    outcome = Outcome(collect_tool_calls=tools is not None and tools.kind != "none", prefer=plan.replica)
    headers = gw.proxy.forward_headers(request.scope["headers"])
    headers["x-request-id"] = request.state.request_id
    if compiled and gw.proxy.engine_headers:  # the engine trusts it only from a keyed caller
        headers[CHECKED_HEADER] = served_reading()

    def record() -> None:
        request.state.replica = outcome.replica
        if tools is not None and outcome.tool_calls is not None:
            _record_tool_calls(gw, tools, outcome.tool_calls, request.state.request_id)
        if outcome.prompt_tokens:
            gw.metrics.child(gw.metrics.tokens, "prompt").inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            gw.metrics.child(gw.metrics.tokens, "completion").inc(outcome.completion_tokens)

    if not parsed.stream:
        sent = time.perf_counter()
        try:
            response = await _unless_client_leaves(
                request, gw.proxy.unary("POST", path, body_bytes, headers, outcome, model=parsed.model))
        finally:
            gw.queue.release()
        record()
        used = gw.spec.record(parsed.model, outcome, plan, elapsed_s=time.perf_counter() - sent, unary=True)
        if plan.k is not None:
            response.headers[SPEC_K_HEADER] = str(plan.k)
        if used is not None:
            response.headers[SPEC_K_MEAN_HEADER] = f"{used[0]:g}"
            response.headers[SPEC_K_MAX_HEADER] = str(used[1])
        return response

    async def on_close(disconnected: bool) -> None:
        gw.queue.release()
        record()
        elapsed = time.perf_counter() - started
        if outcome.spec is not None and outcome.first_chunk_s is not None:
            gw.spec.record(parsed.model, outcome, plan, elapsed_s=elapsed - outcome.first_chunk_s,
                           unary=False)
        if outcome.first_chunk_s is not None:
            gw.metrics.child(gw.metrics.ttft, path).observe(outcome.first_chunk_s)
            if outcome.completion_tokens and outcome.completion_tokens > 1 and not disconnected:
                gw.metrics.child(gw.metrics.tpot, path).observe(
                    (elapsed - outcome.first_chunk_s) / (outcome.completion_tokens - 1))

    try:
        response = await gw.proxy.stream(path, body_bytes, headers, outcome, started,
                                         model=parsed.model, on_close=on_close)
    except BaseException:
        gw.queue.release()
        raise
    if plan.k is not None:
        response.headers[SPEC_K_HEADER] = str(plan.k)
    return response


def _record_tool_calls(gw: Gateway, tools: ToolRequest, by_choice: list[list[Call]], request_id: str) -> None:
    """Count an answer's tool calls and the failures among them (see :mod:`.tools`)."""
    m = gw.metrics
    for calls in by_choice:
        if calls:
            m.child(m.tool_calls, tools.kind).inc(len(calls))
        for reason in failures(tools, calls):
            m.child(m.tool_call_failures, tools.kind, reason).inc()
            log.warning("tool call failed", extra={"fields": {
                "request_id": request_id, "tool_choice": tools.kind, "reason": reason}})


async def _client_left(request: Request) -> None:
    """Return when the client disconnects (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def take_slot(request: Request, queue: AdmissionQueue) -> None:
    """Wait for an engine slot; 499 (and no slot held) when the client leaves first or meanwhile."""
    await _unless_client_leaves(request, queue.acquire(), undo=lambda _: queue.release())


async def _unless_client_leaves(request: Request, work: Awaitable[T],
                                undo: Callable[[T], None] | None = None) -> T:
    """``await work``, cancelled when the client disconnects first (then 499, which nobody reads).

    A request waiting for a slot leaves the queue, and a forwarded one drops its engine
    connection, which makes the engine abort it: a client that sends and hangs up holds nothing.
    When the client leaves in the same instant as ``work`` finishes, ``undo`` (if given) gets
    the result back, and it is a 499 too: a slot granted to a client that left is returned.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watcher.done():
            watcher.cancel()
    left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():
            raise APIError(499, "The client closed the request.", code="client_closed")
    if left and undo is not None and task.exception() is None:
        undo(task.result())
        raise APIError(499, "The client closed the request.", code="client_closed")
    return task.result()


async def _check_prompt_tokens(gw: Gateway, route: Route, body: Mapping[str, Any],
                               request_id: str) -> tuple[int | None, int] | None:
    """400 when the largest prompt has more than ``max_prompt_tokens`` tokens, as an engine counts them.

    Returns the tokens of all prompts together, for the rate limiter, and of the largest
    (``None`` when not all were counted). A count that fails lets the request through (counted in
    ``prompt_token_count_failures``): the engine still checks its own context length.
    """
    cap = gw.config.max_prompt_tokens
    try:
        counted = await count_prompts(route, body, gw.tokenizer, cap=cap)
    except TokenizeFailed as exc:
        gw.metrics.prompt_count_failures.inc()
        log.warning("prompt not counted; forwarded without the token cap", extra={"fields": {
            "request_id": request_id, "error": str(exc)}})
        return None
    tokens = counted.largest
    if tokens > cap:
        raise APIError(400, f"The prompt is too long: it has {tokens} tokens, at most {cap} are accepted.",
                       param="messages" if route == "chat" else "prompt", code="context_length_exceeded",
                       reason="prompt_too_long")
    return counted.total, tokens


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await _generate(request, "/v1/chat/completions", "chat", body)


@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _generate(request, "/v1/completions", "completions", body)
