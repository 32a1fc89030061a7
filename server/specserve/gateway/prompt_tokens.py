"""Exact prompt token counts for ``--max-prompt-tokens``, from the engine's own ``POST /tokenize``.

Only the engine knows how many tokens a request's prompt has: it renders chat messages through
the model's chat template before tokenizing them. vLLM's ``/tokenize`` takes the rendering options
of the generating routes, so the gateway copies them from the request (``add_generation_prompt``,
``continue_final_message``, ``add_special_tokens``, ``chat_template``, ``chat_template_kwargs``,
``tools``...; ``documents`` and ``reasoning_effort`` become template arguments, as in vLLM's chat
route). Token-id prompts are counted by their length, without a round trip. A prompt the engine
will truncate (``truncate_prompt_tokens``) counts as what it keeps. For a list of prompts the
largest one counts against the cap; the total over all of them is what the per-key token rate
limit charges.

Example:
    >>> chat_tokenize_body({"model": "m", "messages": [{"role": "user", "content": "hi"}],
    ...                     "max_tokens": 3, "continue_final_message": True})
    {'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}], 'continue_final_message': True}
    >>> completion_prompts([[1, 2, 3], [4]])
    [[1, 2, 3], [4]]
    >>> async def words(body):  # a stand-in for the engine: one token per word
    ...     return TokenCount(len(body["prompt"].split()))
    >>> import asyncio
    >>> asyncio.run(count_prompts("completions", {"model": "m", "prompt": ["a b", "c d e"]}, words, cap=10))
    PromptCount(largest=3, total=5)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from specserve.gateway.replicas import ReplicaPool

Route = Literal["chat", "completions"]
Prompt = str | list[int]

# Request fields that change how vLLM renders or tokenizes a chat prompt, under the same names in
# its /tokenize request.
_CHAT_FIELDS = ("add_generation_prompt", "continue_final_message", "add_special_tokens", "chat_template",
                "tools", "mm_processor_kwargs", "media_io_kwargs")
# String prompts of one request tokenized at once.
_CONCURRENCY = 8
TOKENIZE_TIMEOUT_S = 10.0
"""Upper bound on one ``/tokenize`` call; a slower engine lets the request through uncounted."""


@dataclass(frozen=True)
class TokenCount:
    """The engine's answer: the prompt's tokens and its context length (``max_model_len``)."""

    count: int
    max_model_len: int | None = None


@dataclass(frozen=True)
class PromptCount:
    """The tokens of a request's prompts, as the engine will keep them."""

    largest: int
    """The largest prompt: what ``--max-prompt-tokens`` caps."""
    total: int | None
    """All prompts together; ``None`` when not every prompt was counted (truncation answered
    without the engine, or counting stopped once a prompt was over the cap)."""


class TokenizeFailed(Exception):
    """The engine could not count a prompt (unreachable, error status, timeout, odd answer)."""


Tokenize = Callable[[dict[str, Any]], Awaitable[TokenCount]]


def template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """``chat_template_kwargs`` as vLLM's chat route builds them from the request.

    Example:
        >>> template_kwargs({"chat_template_kwargs": {"x": 1}, "reasoning_effort": "none"})
        {'x': 1, 'reasoning_effort': 'none', 'enable_thinking': False}
        >>> template_kwargs({})
        {}
    """
    user = body.get("chat_template_kwargs")
    kwargs = dict(user) if isinstance(user, Mapping) else {}
    if body.get("documents") is not None:
        kwargs["documents"] = body["documents"]
    effort = body.get("reasoning_effort")
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        if not (isinstance(user, Mapping) and "enable_thinking" in user):
            kwargs["enable_thinking"] = effort != "none"
    return kwargs


def chat_tokenize_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/tokenize`` request that renders a chat request's prompt as its generation will."""
    out: dict[str, Any] = {"model": body.get("model"), "messages": body.get("messages")}
    for name in _CHAT_FIELDS:
        if body.get(name) is not None:
            out[name] = body[name]
    kwargs = template_kwargs(body)
    if kwargs:
        out["chat_template_kwargs"] = kwargs
    return out


def completion_tokenize_body(body: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    """The ``/tokenize`` request for one text prompt of a completions request.

    Example:
        >>> completion_tokenize_body({"model": "m", "add_special_tokens": False}, "hi")
        {'model': 'm', 'prompt': 'hi', 'add_special_tokens': False}
    """
    out: dict[str, Any] = {"model": body.get("model"), "prompt": prompt}
    if body.get("add_special_tokens") is not None:
        out["add_special_tokens"] = body["add_special_tokens"]
    return out


def completion_prompts(prompt: object) -> list[Prompt]:
    """The prompts of a completions request: a string, strings, a token-id list, or token-id lists.

    Example:
        >>> completion_prompts("hi"), completion_prompts(["a", "b"]), completion_prompts([5, 6])
        (['hi'], ['a', 'b'], [[5, 6]])
    """
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list):
        return []
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    return [p for p in prompt if isinstance(p, str | list)]


def kept_tokens(count: int, truncate: object, max_model_len: int | None = None) -> int:
    """Tokens the engine keeps of a ``count``-token prompt under ``truncate_prompt_tokens``.

    ``-1`` keeps up to the context length; ``None`` (or anything but an int) keeps all.

    Example:
        >>> kept_tokens(100, 30), kept_tokens(100, None), kept_tokens(100, -1, max_model_len=64)
        (30, 100, 64)
    """
    if isinstance(truncate, bool) or not isinstance(truncate, int):
        return count
    if truncate == -1:
        return min(count, max_model_len) if max_model_len else count
    return min(count, max(truncate, 0))


async def count_prompts(route: Route, body: Mapping[str, Any], tokenize: Tokenize, *, cap: int) -> PromptCount:
    """Tokens of the request's prompts as the engine will see them.

    It may stop counting once a prompt is over ``cap``, and answers ``truncate_prompt_tokens``
    itself when the engine keeps no more than ``cap`` tokens anyway; either way ``total`` is then
    unknown. Raises :class:`TokenizeFailed` when the engine could not count a text prompt.

    Example:
        >>> async def never(body):
        ...     raise AssertionError("no call expected")
        >>> asyncio.run(count_prompts("completions", {"prompt": [[1, 2], [3]]}, never, cap=5))
        PromptCount(largest=2, total=3)
        >>> asyncio.run(count_prompts("chat", {"truncate_prompt_tokens": 4}, never, cap=5))
        PromptCount(largest=4, total=None)
    """
    truncate = body.get("truncate_prompt_tokens")
    if isinstance(truncate, int) and not isinstance(truncate, bool) and 0 <= truncate <= cap:
        return PromptCount(truncate, None)  # the engine keeps at most this many: nothing to count
    if route == "chat":
        counted = await tokenize(chat_tokenize_body(body))
        kept = kept_tokens(counted.count, truncate, counted.max_model_len)
        return PromptCount(kept, kept)
    prompts = completion_prompts(body.get("prompt"))
    kept = [kept_tokens(len(p), truncate) for p in prompts if isinstance(p, list)]
    texts = [p for p in prompts if isinstance(p, str)]
    for start in range(0, len(texts), _CONCURRENCY):
        if max(kept, default=0) > cap:
            return PromptCount(max(kept), None)
        batch = texts[start:start + _CONCURRENCY]
        counts = await asyncio.gather(*(tokenize(completion_tokenize_body(body, t)) for t in batch))
        kept += [kept_tokens(c.count, truncate, c.max_model_len) for c in counts]
    return PromptCount(max(kept, default=0), sum(kept))


class EngineTokenizer:
    """Counts a prompt with ``POST /tokenize`` on a healthy replica serving the model."""

    def __init__(
        self, pool: ReplicaPool, session: Callable[[], aiohttp.ClientSession | None],
        *, timeout_s: float = TOKENIZE_TIMEOUT_S,
    ) -> None:
        self.pool = pool
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __call__(self, payload: dict[str, Any]) -> TokenCount:
        session = self.session()
        model = payload.get("model")
        replica = self.pool.pick(model=model if isinstance(model, str) else None, rotate=False)
        if session is None or replica is None:
            raise TokenizeFailed("no engine replica is ready")
        try:
            async with session.post(replica.url + "/tokenize", json=payload, timeout=self.timeout) as response:
                if response.status != 200:
                    text = (await response.text(errors="replace"))[:200]
                    raise TokenizeFailed(f"{replica.url} answered {response.status}: {text}")
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise TokenizeFailed(f"{replica.url}: {type(exc).__name__} {exc}") from exc
        return token_count(data)


def token_count(data: object) -> TokenCount:
    """The count in a ``/tokenize`` answer.

    Example:
        >>> token_count({"count": 3, "max_model_len": 512, "tokens": [1, 2, 3]})
        TokenCount(count=3, max_model_len=512)
        >>> token_count({"tokens": []})
        Traceback (most recent call last):
        ...
        specserve.gateway.prompt_tokens.TokenizeFailed: no token count in the answer
    """
    count = data.get("count") if isinstance(data, dict) else None
    if isinstance(count, bool) or not isinstance(count, int):
        raise TokenizeFailed("no token count in the answer")
    limit = data.get("max_model_len") if isinstance(data, dict) else None
    return TokenCount(count, limit if isinstance(limit, int) and not isinstance(limit, bool) else None)

