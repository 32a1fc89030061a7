"""Load for in-process engine benchmarks: open-loop arrivals, closed-loop clients, phased traces.

Each driver steps a vLLM ``LLMEngine`` itself (``add_request`` / ``step``; no HTTP, no threads),
so the client is as light as it can be on a machine it shares with the engine. Latency counts
from the scheduled arrival (open loop: queueing counts) or from the moment a client sends
(closed loop). ``on_step(now_s)`` runs after every engine step, for step traces; a
:class:`StepLog` counts every step's time and output tokens by the requests the engine held.
Arrival times and output lengths are precomputed from a seed, so every arm gets the same load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specserve.bench.stats import is_looping


@dataclass
class Finished:
    """One request's timeline (``time.perf_counter`` seconds) and its output tokens."""

    sent: float
    first: float
    done: float
    tokens: list[int] = field(default_factory=list)
    # closed loop: this request's tokens when the first client ran out of requests, and the
    # seconds the run kept every client busy (carried by the run's first request, 0 on the
    # others, so the runs of interleaved parts add up)
    full_load_tokens: int = 0
    full_load_s: float = 0.0


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    """``n`` Poisson arrival times (s from the start) at ``rate`` per second.

    >>> a = arrivals(2.0, 1000, seed=1); round(len(a) / a[-1], 1)
    2.0
    """
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps).tolist()


def phased_arrivals(phases: Sequence[tuple[float, float]], seed: int) -> list[float]:
    """Poisson arrivals through ``(rate, duration_s)`` phases in turn (a load step trace).

    >>> a = phased_arrivals([(1.0, 100.0), (8.0, 100.0)], seed=0)
    >>> sum(t < 100 for t in a) < 150 < sum(t >= 100 for t in a)
    True
    """
    rng = np.random.default_rng(seed)
    out: list[float] = []
    start = 0.0
    for rate, duration in phases:
        t = start + float(rng.exponential(1.0 / rate))
        while t < start + duration:
            out.append(t)
            t += float(rng.exponential(1.0 / rate))
        start += duration
    return out


def output_lengths(mean: int, n: int, seed: int, sigma: float = 0.6) -> list[int]:
    """Lognormal output lengths with the given mean, clipped to ``[4, 4 * mean]``.

    >>> ls = output_lengths(48, 2000, seed=0); 40 < sum(ls) / len(ls) < 56
    True
    """
    mu = np.log(mean) - sigma ** 2 / 2
    raw = np.random.default_rng(seed + 1).lognormal(mu, sigma, size=n)
    return np.clip(np.round(raw), 4, 4 * mean).astype(int).tolist()


class StepLog:
    """Engine steps by the number of requests the engine held when each began: steps, output
    tokens and seconds (the whole ``engine.step()``: scheduling, forward, sampling, drafting and
    output processing). A closed loop at many clients mixes full-load steps with its drain, and
    an arm's tokens per second alone does not say at which batch sizes it wins or loses. The
    ``running_*`` sums leave out the steps after a request was admitted (:meth:`admit`), which
    prefill its prompt: what is left are steps of running requests only.

    >>> log = StepLog()
    >>> log.add(16, 16, 0.004); log.admit(); log.add(16, 40, 0.010); log.add(1, 3, 0.002)
    >>> s = log.summary()["16"]
    >>> s["tokens_per_step"], s["ms_per_step"], s["tokens_per_ms"], s["running_steps"], s["running_tokens_per_ms"]
    (28.0, 7.0, 4.0, 1, 4.0)
    """

    def __init__(self) -> None:
        self.cells: dict[int, list[float]] = {}
        """Requests held -> ``[steps, tokens, seconds]`` of all steps, then of running-only steps."""
        self._admitted = False

    def admit(self) -> None:
        """A request was added: the next step prefills it."""
        self._admitted = True

    def add(self, requests: int, tokens: int, seconds: float) -> None:
        cell = self.cells.setdefault(requests, [0, 0, 0.0, 0, 0, 0.0])
        for offset in (0,) if self._admitted else (0, 3):
            cell[offset] += 1
            cell[offset + 1] += tokens
            cell[offset + 2] += seconds
        self._admitted = False

    def summary(self) -> dict[str, dict[str, float]]:
        """Per number of requests held (a string key, for JSON): the sums and what they give."""
        return by_requests({str(n): dict(zip(SUMS, c)) for n, c in sorted(self.cells.items())})


SUMS = ("steps", "tokens", "seconds", "running_steps", "running_tokens", "running_seconds")
"""The sums a :class:`StepLog` keeps per number of requests held."""


def by_requests(sums: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{requests: sums}`` (:data:`SUMS`) with tokens per step, ms per step and tokens per ms,
    of all steps and of running-only steps.

    >>> cell = by_requests({"2": dict(zip(SUMS, (4, 10, 0.005, 1, 2, 0.001)))})["2"]
    >>> cell["tokens_per_step"], cell["ms_per_step"], cell["tokens_per_ms"], cell["running_tokens_per_ms"]
    (2.5, 1.25, 2.0, 2.0)
    """
    out = {}
    for n, c in sums.items():
        cell: dict[str, float] = {}
        for prefix in ("", "running_"):
            steps, tokens, seconds = int(c[f"{prefix}steps"]), int(c[f"{prefix}tokens"]), float(c[f"{prefix}seconds"])
            cell.update({f"{prefix}steps": steps, f"{prefix}tokens": tokens, f"{prefix}seconds": round(seconds, 9),
                         f"{prefix}tokens_per_step": round(tokens / steps, 2) if steps else 0.0,
                         f"{prefix}ms_per_step": round(1e3 * seconds / steps, 3) if steps else 0.0,
                         f"{prefix}tokens_per_ms": round(tokens / (1e3 * seconds), 3) if seconds > 0 else 0.0})
        out[n] = cell
    return out


def merge_by_requests(parts: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The sums of several :meth:`StepLog.summary` (repetitions of a point), derived again.

    >>> a = by_requests({"1": dict(zip(SUMS, (2, 2, 0.004, 2, 2, 0.004)))})
    >>> merged = merge_by_requests([a, a]); merged["1"]["steps"], merged["1"]["tokens_per_ms"]
    (4, 0.5)
    """
    sums: dict[str, dict[str, float]] = {}
    for part in parts:
        for n, c in part.items():
            cell = sums.setdefault(n, dict.fromkeys(SUMS, 0))
            for key in SUMS:
                cell[key] += c[key]
    return by_requests(dict(sorted(sums.items(), key=lambda kv: int(kv[0]))))


def _collect(engine: Any, results: dict[str, Finished], first: dict[str, float],
             produced: dict[str, int], steps: StepLog | None = None) -> list[str]:
    """One engine step; the ids of the requests it finished. ``produced``: tokens so far, by id
    (updated); ``steps``: where the step's time and new tokens are counted."""
    ended = []
    held = engine.get_num_unfinished_requests() if steps is not None else 0
    start = time.perf_counter()
    outputs = engine.step()
    seconds = time.perf_counter() - start
    new = 0
    for out in outputs:
        stamp = time.perf_counter()
        tokens = out.outputs[0].token_ids if out.outputs else []
        new += len(tokens) - produced.get(out.request_id, 0)
        produced[out.request_id] = len(tokens)
        if tokens and out.request_id not in first:
            first[out.request_id] = stamp
        if out.finished:
            done = results[out.request_id]
            done.first, done.done, done.tokens = first.get(out.request_id, stamp), stamp, list(tokens)
            ended.append(out.request_id)
    if steps is not None:
        steps.add(held, new, seconds)
    return ended


def open_loop(engine: Any, requests: Sequence[tuple[Any, Any]], times: Sequence[float], tag: str,
              on_step: Callable[[float], None] | None = None,
              steps: StepLog | None = None) -> tuple[list[Finished], float]:
    """Add ``requests[i]`` (``(prompt, params)``) at ``times[i]`` s; step until all finish.

    Returns the finished requests in order and the span (start to the last finish, s).
    """
    pending = list(range(len(requests)))
    results: dict[str, Finished] = {}
    first: dict[str, float] = {}
    produced: dict[str, int] = {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and times[pending[0]] <= now:
            i = pending.pop(0)
            rid = f"{tag}-{i}"
            engine.add_request(rid, *requests[i])
            results[rid] = Finished(sent=t0 + times[i], first=0.0, done=0.0)
            if steps is not None:
                steps.admit()
        if not engine.has_unfinished_requests():
            if pending:  # idle until the next arrival (at most 10 ms per turn)
                time.sleep(max(0.0, min(0.01, times[pending[0]] - now)))
            continue
        _collect(engine, results, first, produced, steps)
        if on_step is not None:
            on_step(time.perf_counter() - t0)
    ordered = [results[f"{tag}-{i}"] for i in range(len(requests))]
    return ordered, max((r.done for r in ordered), default=t0) - t0


def closed_loop(engine: Any, requests: Sequence[tuple[Any, Any]], clients: int, tag: str,
                on_step: Callable[[float], None] | None = None,
                steps: StepLog | None = None) -> tuple[list[Finished], float]:
    """``clients`` clients, each sending its next request when its last one finishes.

    The run is at full load until the first client finds no request left to send; from there it
    drains at ever fewer rows, which takes a large share of a short run at many clients (the
    requests' ``full_load_*`` fields, read by :func:`summarise`).
    """
    results: dict[str, Finished] = {}
    first: dict[str, float] = {}
    produced: dict[str, int] = {}
    nxt = 0
    full = True
    t0 = time.perf_counter()

    def send() -> None:
        nonlocal nxt
        rid = f"{tag}-{nxt}"
        engine.add_request(rid, *requests[nxt])
        results[rid] = Finished(sent=time.perf_counter(), first=0.0, done=0.0)
        nxt += 1
        if steps is not None:
            steps.admit()

    while nxt < min(clients, len(requests)):
        send()
    while engine.has_unfinished_requests():
        for ended in _collect(engine, results, first, produced, steps):
            if nxt < len(requests):
                send()
            elif full:  # a client went idle: the drain starts
                full = False
                for rid, done in results.items():
                    done.full_load_tokens = produced.get(rid, 0)
                results[f"{tag}-0"].full_load_s = results[ended].done - t0
        if on_step is not None:
            on_step(time.perf_counter() - t0)
    ordered = [results[f"{tag}-{i}"] for i in range(len(requests))]
    return ordered, max((r.done for r in ordered), default=t0) - t0


def summarise(finished: Sequence[Finished], span: float) -> dict[str, float]:
    """Mean / p50 / p99 latency (s), mean TTFT and TPOT (ms), output tokens/s, looping share;
    for closed-loop runs also tokens/s while every client was busy and that time's share of ``span``.

    Example:
        >>> runs = [Finished(0.0, 0.1, 1.1, [1, 2] * 10), Finished(0.5, 0.7, 1.7, list(range(11)))]
        >>> s = summarise(runs, span=1.7)
        >>> s["latency_mean_s"], s["tpot_mean_ms"], s["tokens_per_s"], s["looping_share"]
        (1.15, 76.32, 18.2, 0.5)
    """
    latency = [r.done - r.sent for r in finished]
    q = np.quantile(latency, [0.5, 0.99]).tolist()
    tpot = [(r.done - r.first) / (len(r.tokens) - 1) for r in finished if len(r.tokens) > 1]
    tokens = sum(len(r.tokens) for r in finished)
    return {"latency_mean_s": round(statistics.fmean(latency), 3), "latency_p50_s": round(q[0], 3),
            "latency_p99_s": round(q[1], 3),
            "ttft_mean_ms": round(1e3 * statistics.fmean(r.first - r.sent for r in finished), 1),
            "tpot_mean_ms": round(1e3 * statistics.fmean(tpot), 2) if tpot else 0.0,
            "tokens_per_s": round(tokens / span, 1) if span > 0 else 0.0,
            "looping_share": round(sum(is_looping(r.tokens) for r in finished) / len(finished), 3),
            **full_load(finished, span)}


def full_load(finished: Sequence[Finished], span: float) -> dict[str, float]:
    """Tokens/s while every client was busy, and that time's share of ``span`` (closed loop only).

        >>> runs = [Finished(0.0, 0.1, 2.0, [1] * 20, 12, 1.0), Finished(0.0, 0.1, 1.5, [1] * 8, 8)]
        >>> full_load(runs, 2.0), full_load(runs[1:], 1.5)
        ({'tokens_per_s_full_load': 20.0, 'full_load_share': 0.5}, {})
    """
    window = sum(r.full_load_s for r in finished)
    if window <= 0:
        return {}
    return {"tokens_per_s_full_load": round(sum(r.full_load_tokens for r in finished) / window, 1),
            "full_load_share": round(window / span, 3) if span > 0 else 0.0}


__all__ = ["Finished", "StepLog", "arrivals", "by_requests", "closed_loop", "full_load", "merge_by_requests",
           "open_loop", "output_lengths", "phased_arrivals", "summarise", "SUMS"]
