"""The compile pool's waiters are all woken when a worker joins, and a replacement start does
not hold up requests that wait for the pool's first start.

A single wake-up per started worker went to one waiter of several; the others (a request's
``prepare`` in the gateway) slept until their 300 s limit, so a ``json_schema`` request stayed
unanswered under mixed load. Workers here are stand-ins whose start the test releases, so the
order of events is the test's, not the machine's.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from specserve.structured import workers as workers_mod
from specserve.structured.workers import CompileWorkers

BOUND_S = 30.0


class _GatedWorker:
    """A worker whose start waits for the test's gate; it is never given a job here."""

    gate = threading.Event()

    def __init__(self, ctx: Any) -> None:
        if not self.gate.wait(BOUND_S):
            raise RuntimeError("gate never opened")

    def kill(self) -> None:
        pass


@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch) -> type[_GatedWorker]:
    _GatedWorker.gate = threading.Event()
    monkeypatch.setattr(workers_mod, "_Worker", _GatedWorker)
    return _GatedWorker


def _wait_for_waiters(pool: CompileWorkers, count: int) -> None:
    deadline = time.monotonic() + BOUND_S
    while len(pool._cond._waiters) < count:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, (
            f"only {len(pool._cond._waiters)} of {count} threads waiting")  # type: ignore[attr-defined]
        time.sleep(0.01)


def test_one_started_worker_wakes_every_waiter(gated: type[_GatedWorker]) -> None:
    pool = CompileWorkers(size=1)
    taken: list[Any] = []
    threads = [threading.Thread(target=pool.wait_started, args=(BOUND_S * 4,)) for _ in range(3)]
    threads.append(threading.Thread(target=lambda: taken.append(pool._take(time.monotonic() + BOUND_S * 4))))
    for thread in threads:
        thread.start()
    _wait_for_waiters(pool, len(threads))  # all four asleep on the pool's condition
    gated.gate.set()
    for thread in threads:
        thread.join(BOUND_S)
    asleep = [t for t in threads if t.is_alive()]
    assert not asleep, f"{len(asleep)} of {len(threads)} waiters were never woken"
    assert len(taken) == 1 and isinstance(taken[0], _GatedWorker)
    pool.close()


def test_a_replacement_start_does_not_hold_up_wait_started(gated: type[_GatedWorker]) -> None:
    gated.gate.set()
    pool = CompileWorkers(size=1)
    pool.wait_started(BOUND_S)
    assert pool._idle, "the first worker did not start"
    gated.gate = threading.Event()  # the next start (a replacement) hangs until released
    pool._replace()
    assert pool._starting == 1
    done = threading.Event()
    threading.Thread(target=lambda: (pool.wait_started(BOUND_S * 4), done.set())).start()
    assert done.wait(BOUND_S), "wait_started waited for a replacement worker"
    assert pool._starting == 1  # the replacement was still starting when wait_started returned
    gated.gate.set()
    pool.close()
