"""Admission control: API keys, per-key rate limits and the bounded queue in front of the engines.

Example:
    >>> w = SlidingWindow(limit=2, window_s=60.0)
    >>> w.try_take(1, now=0.0), w.try_take(1, now=1.0), w.try_take(1, now=2.0)
    (True, True, False)
    >>> w.retry_after(now=2.0)
    58.0
    >>> w.try_take(1, now=61.0)
    True
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections import deque
from collections.abc import Iterable

from specserve.errors import APIError
from specserve.gateway.config import KeyLimits


class SlidingWindow:
    """Amounts taken in the last ``window_s`` seconds must stay within ``limit``."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._total -= self._events.popleft()[1]

    def can_take(self, amount: int, now: float) -> bool:
        """Whether ``amount`` fits now (an empty window takes any amount, so that one request over
        the whole limit is not refused for ever)."""
        self._expire(now)
        return self._total + amount <= self.limit or self._total == 0

    def total(self, now: float) -> int:
        """The amount taken in the window ending ``now``."""
        self._expire(now)
        return self._total

    def take(self, amount: int, now: float) -> None:
        self._expire(now)
        self._events.append((now, amount))
        self._total += amount

    def try_take(self, amount: int, now: float) -> bool:
        if not self.can_take(amount, now):
            return False
        self.take(amount, now)
        return True

    def retry_after(self, now: float) -> float:
        """Seconds until the oldest amount leaves the window."""
        if not self._events:
            return 0.0
        return max(0.0, self._events[0][0] + self.window_s - now)


def check_api_key(authorization: str | None, keys: Iterable[str]) -> str:
    """The caller's key if ``Authorization: Bearer <key>`` names an accepted key; else 401.

    Example:
        >>> check_api_key("Bearer sk-1", ["sk-1"])
        'sk-1'
    """
    if not authorization or not authorization.lower().startswith("bearer "):
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key",
                       reason="auth")
    given = authorization[7:].strip()
    for key in keys:
        if hmac.compare_digest(given.encode(), key.encode()):
            return key
    raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", reason="auth")


class KeyGuard:
    """The API-key check at the door, and a throttle on addresses that keep guessing.

    Each missing or wrong key counts against the client address it came from; an address with
    ``bad_key_limit`` of them in the last ``window_s`` gets 429 for every request (its keys are
    not even compared) until the oldest leaves the window. Without keys every request passes,
    keyed by its address.

    Example:
        >>> guard = KeyGuard(("sk-1",), bad_key_limit=2)
        >>> guard.check("Bearer sk-1", "10.0.0.1", now=0.0)
        'sk-1'
        >>> for _ in range(2):
        ...     try:
        ...         guard.check("Bearer guess", "10.0.0.2", now=1.0)
        ...     except APIError as err:
        ...         print(err.status)
        401
        401
        >>> try:
        ...     guard.check("Bearer sk-1", "10.0.0.2", now=2.0)
        ... except APIError as err:
        ...     print(err.status, err.headers)
        429 {'Retry-After': '59'}
        >>> guard.check("Bearer sk-1", "10.0.0.2", now=61.5)
        'sk-1'
    """

    def __init__(self, keys: Iterable[str], bad_key_limit: int = 20, window_s: float = 60.0,
                 max_addresses: int = 100_000) -> None:
        self.keys = tuple(keys)
        self.bad_key_limit = bad_key_limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._bad: dict[str, SlidingWindow] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None, address: str, now: float | None = None) -> str:
        """The rate-limit key of a request: its API key (auth on) or ``address`` (auth off).
        401 for a missing or wrong key, 429 while ``address`` is throttled."""
        if not self.keys:
            return address
        now = time.monotonic() if now is None else now
        window = self._bad.get(address)
        if window is not None and self.bad_key_limit and window.total(now) >= self.bad_key_limit:
            retry = max(1, math.ceil(window.retry_after(now)))
            raise APIError(429, f"Too many requests with a wrong API key from this address. Retry "
                                f"after {retry} s.", code="too_many_bad_keys",
                           headers={"Retry-After": str(retry)}, reason="bad_key_throttle")
        try:
            return check_api_key(authorization, self.keys)
        except APIError:
            if self.bad_key_limit:
                if window is None:
                    if len(self._bad) >= self.max_addresses:
                        self._bad.clear()  # bounded memory; throttles restart
                    window = self._bad[address] = SlidingWindow(self.bad_key_limit, self.window_s)
                window.take(1, now)
            raise


COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""vLLM's (and OpenAI's) ``max_tokens`` for a completions request that leaves it out."""


def engine_max_tokens(route: str, requested: int | None, sent_null: bool, context: int | None,
                      prompt_tokens: int | None) -> int | None:
    """The most tokens per choice the engine will generate for a request, as vLLM 0.32 decides:
    ``max_tokens`` when given; 16 for completions that leave it out; else (chat, or an explicit
    ``null``) the rest of the context: ``context`` less the prompt's tokens when counted, the whole
    context when not. ``None`` when that is unknown (no context reported).

    Example:
        >>> engine_max_tokens("chat", None, False, context=2048, prompt_tokens=48)
        2000
        >>> engine_max_tokens("completions", None, False, context=2048, prompt_tokens=None)
        16
        >>> engine_max_tokens("completions", None, True, context=2048, prompt_tokens=None)
        2048
        >>> engine_max_tokens("chat", 7, False, context=None, prompt_tokens=None)
        7
    """
    if requested is not None:
        return requested
    if route == "completions" and not sent_null:
        return COMPLETIONS_DEFAULT_MAX_TOKENS
    if context is None:
        return None
    return max(1, context - (prompt_tokens or 0))


def charged_tokens(prompt_chars: int, max_tokens: int | None, n: int | None,
                   prompt_tokens: int | None = None, prompts: int = 1) -> int:
    """Tokens a request spends of its key's ``tokens_per_minute``: its prompts and what it may
    generate.

    The prompts are charged their exact token count when the gateway has one (``--max-prompt-tokens``
    counted them), else an estimate of four characters a token. Generation is ``max_tokens`` (what
    the engine will allow, :func:`engine_max_tokens`; 16 when even that is unknown) for each of the
    ``n`` choices of each of the ``prompts`` (a completions request may send a list; the engine
    answers every prompt ``n`` times).

    Example:
        >>> charged_tokens(prompt_chars=400, max_tokens=10, n=2)  # 400 // 4 + 10 * 2
        120
        >>> charged_tokens(prompt_chars=400, max_tokens=10, n=2, prompt_tokens=7)
        27
        >>> charged_tokens(prompt_chars=8, max_tokens=None, n=None)
        18
        >>> charged_tokens(prompt_chars=8, max_tokens=10, n=2, prompts=3)  # 8 // 4 + 10 * 2 * 3
        62
    """
    prompt = prompt_tokens if prompt_tokens is not None else prompt_chars // 4
    return prompt + (max_tokens or 16) * (n or 1) * max(1, prompts)


class RateLimiter:
    """Per-key request and token windows (keys are API keys, or client addresses without auth)."""

    def __init__(self, limits: KeyLimits, max_keys: int = 100_000) -> None:
        self.limits = limits
        self.max_keys = max_keys
        self._requests: dict[str, SlidingWindow] = {}
        self._tokens: dict[str, SlidingWindow] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.limits.requests_per_minute or self.limits.tokens_per_minute)

    def _window(self, table: dict[str, SlidingWindow], key: str, limit: int) -> SlidingWindow:
        window = table.get(key)
        if window is None:
            if len(table) >= self.max_keys:
                table.clear()  # bounded memory under key churn; limits restart
            window = table[key] = SlidingWindow(limit)
        return window

    def _windows(self, key: str, tokens: int) -> list[tuple[SlidingWindow, int, int, str]]:
        """(window, limit, amount, what) of each limit that is on."""
        checks = (
            (self._requests, self.limits.requests_per_minute, 1, "requests"),
            (self._tokens, self.limits.tokens_per_minute, tokens, "tokens"),
        )
        return [(self._window(table, key, limit), limit, amount, what)
                for table, limit, amount, what in checks if limit]

    def check(self, key: str, tokens: int = 1, now: float | None = None) -> None:
        """429 with Retry-After if a request of ``tokens`` would be over a limit of ``key``; takes nothing.

        With the default of one token it refuses a key that has spent a whole window, before any
        work (such as counting the prompt's tokens) is done for the request.
        """
        now = time.monotonic() if now is None else now
        for window, limit, amount, what in self._windows(key, tokens):
            if not window.can_take(amount, now):
                retry = max(1, math.ceil(window.retry_after(now)))
                raise APIError(
                    429,
                    f"Rate limit reached: {limit} {what} per minute. Retry after {retry} s.",
                    code=f"rate_limit_{what}",
                    headers={"Retry-After": str(retry)},
                    reason="rate_limit",
                )

    def admit(self, key: str, tokens: int, now: float | None = None) -> None:
        """Count one request of ``tokens`` for ``key``; 429 with Retry-After when over a limit.

        All or nothing: a request refused by one limit is not counted against the others.
        """
        now = time.monotonic() if now is None else now
        self.check(key, tokens, now)
        for window, _, amount, _ in self._windows(key, tokens):
            window.take(amount, now)


class AdmissionQueue:
    """At most ``max_in_flight`` requests at the engines, at most ``max_queue`` waiting for a slot."""

    def __init__(self, max_in_flight: int, max_queue: int, timeout_s: float) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self.waiting = 0
        self.active = 0

    async def acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            self.active += 1
            return
        if self.waiting >= self.max_queue:
            raise APIError(503, "The server is overloaded: the request queue is full.",
                           code="queue_full", headers={"Retry-After": "1"}, reason="queue_full")
        self.waiting += 1
        try:
            # Not ``wait_for``: on 3.11 it can swallow a cancel that lands as the slot is granted,
            # and a request whose client left would go on to the engine.
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise APIError(503, "The server is overloaded: timed out waiting in the queue.",
                           code="queue_timeout", headers={"Retry-After": "1"}, reason="queue_full") from None
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()
