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
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    given = authorization[7:].strip()
    for key in keys:
        if hmac.compare_digest(given.encode(), key.encode()):
            return key
    raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def charged_tokens(prompt_chars: int, max_tokens: int | None, n: int | None,
                   prompt_tokens: int | None = None, prompts: int = 1) -> int:
    """Tokens a request spends of its key's ``tokens_per_minute``: its prompts and what it may
    generate.

    The prompts are charged their exact token count when the gateway has one (``--max-prompt-tokens``
    counted them), else an estimate of four characters a token. Generation is ``max_tokens`` (16,
    OpenAI's default, when unset) for each of the ``n`` choices of each of the ``prompts`` (a
    completions request may send a list; the engine answers every prompt ``n`` times).

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
                           code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, "The server is overloaded: timed out waiting in the queue.",
                           code="queue_timeout", headers={"Retry-After": "1"}) from None
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._slots.release()
