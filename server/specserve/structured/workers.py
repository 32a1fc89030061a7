"""Worker processes that compile constraints, each compile bounded in time.

A grammar compile runs in native code that cannot be interrupted: a thread given up on keeps its
core (and its worker slot) until the compile ends, 11 s for a 1,500-branch ``anyOf``. A worker
process can be killed. :class:`CompileWorkers` keeps ``size`` processes, hands each compile to an
idle one, and kills and replaces a worker whose compile outlives its time limit, so a slow schema
costs its sender the time limit and nobody else anything.

Workers fork from a ``forkserver`` that has xgrammar imported (``set_forkserver_preload``), so a
replacement is ready without importing it again; a worker joins the pool only once it has answered
a first job.

Example:
    >>> workers = CompileWorkers(size=1)
    >>> workers.run(compile_job, ("regex", "[a-z]+"), timeout_s=60) is None
    True
    >>> workers.run(compile_job, ("regex", "(unclosed"), timeout_s=60) is not None
    True
    >>> workers.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

logger = logging.getLogger(__name__)

Job = Callable[[Any], "str | None"]


class WorkersBusy(Exception):
    """No worker became free within the time limit."""


def compile_job(args: tuple[str, Any]) -> str | None:
    """The default job: why ``(kind, spec)`` cannot be served, or ``None`` (see
    :func:`specserve.structured.served.compile_served`)."""
    from specserve.structured.served import NotServable, compile_served

    kind, spec = args
    try:
        compile_served(kind, spec)  # type: ignore[arg-type]
    except NotServable as err:
        return str(err)
    return None


def _serve(conn: Connection) -> None:
    """A worker's loop: run each ``(job, args)`` received and send back its answer."""
    while True:
        try:
            job, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        try:
            answer: tuple[str, Any] = ("ok", job(args))
        except Exception as err:  # noqa: BLE001 - a job's failure is its answer
            answer = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(answer)
        except (OSError, ValueError):
            return


def _context() -> BaseContext:
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["xgrammar", "specserve.structured.served"])
        return ctx
    except ValueError:  # pragma: no cover - platforms without forkserver
        return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx: BaseContext) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), name="grammar-compile", daemon=True)
        self.process.start()
        child.close()
        # A first job, waited for without a limit: a new worker imports the parent's main module
        # (vLLM's server, in an engine) before it serves, which must not count against a request.
        self.conn.send((compile_job, ("regex", "a")))
        self.conn.recv()

    def kill(self) -> None:
        self.process.kill()
        self.conn.close()
        self.process.join(timeout=5)


class CompileWorkers:
    """``size`` worker processes; :meth:`run` gives a job to an idle one, within a time limit."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._ctx = _context()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._starting = 0
        self._first_starts = size
        """Initial workers not yet started (or failed): :meth:`wait_started` waits for these only."""
        self._closed = False
        self.killed = 0
        """Workers killed for running over their time limit (for tests and logs)."""
        for _ in range(size):
            self._replace()

    def _replace(self) -> None:
        """Start one worker in the background; it joins the idle list when started."""
        with self._cond:
            self._starting += 1

        def start() -> None:
            worker: _Worker | None = None
            try:
                worker = _Worker(self._ctx)
            except Exception:  # noqa: BLE001 - logged; the pool runs with one worker fewer
                if not self._closed:  # a pool closed while this one started: expected, not an error
                    logger.exception("could not start a grammar compile worker")
            with self._cond:
                self._starting -= 1
                self._first_starts = max(0, self._first_starts - 1)
                if worker is not None and not self._closed:
                    self._idle.append(worker)
                    worker = None
                # Every waiter: those taking a worker and those waiting for the first start share
                # this condition, and a single wake-up can go to one that keeps waiting.
                self._cond.notify_all()
            if worker is not None:
                worker.kill()

        threading.Thread(target=start, name="grammar-worker-start", daemon=True).start()

    def wait_started(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the initial workers have started: the first start
        imports xgrammar in the fork server, which takes seconds. A replacement starting later
        (after a kill) is not waited for: requests meanwhile wait for a free worker within their
        own time limit."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._first_starts and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _take(self, deadline: float) -> _Worker:
        with self._cond:
            while not self._idle:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    raise WorkersBusy("no grammar compile worker is free")
                self._cond.wait(remaining)
            return self._idle.pop()

    def _give_back(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                worker.kill()
                return
            self._idle.append(worker)
            self._cond.notify_all()

    def run(self, job: Job, args: Any, timeout_s: float) -> str | None:
        """``job(args)`` in a worker: its answer, or a refusal when it takes more than ``timeout_s``
        (the worker is then killed and replaced). Waiting for a free worker is bounded by
        ``timeout_s`` too (:class:`WorkersBusy` when none frees up in time), but the job's own
        ``timeout_s`` starts when a worker has it: time spent waiting (for a busy pool, or for
        the first workers to start) is never taken for a slow constraint."""
        worker = self._take(time.monotonic() + timeout_s)
        try:
            worker.conn.send((job, args))
            if worker.conn.poll(timeout_s):
                status, value = worker.conn.recv()
                self._give_back(worker)
                if status == "error":
                    return f"the grammar compiler failed: {value}"
                return value  # type: ignore[no-any-return]
        except (EOFError, OSError, ValueError):
            worker.kill()
            self._replace()
            return "the grammar compiler crashed on this constraint"
        worker.kill()
        self.killed += 1
        self._replace()
        return f"compiling it took longer than {timeout_s:g} s"

    def close(self, wait_s: float = 10.0) -> None:
        """Kill the idle workers, and wait (at most ``wait_s``) for workers still starting, which
        kill themselves on seeing the pool closed: a process exiting in the middle of a start
        leaves the fork server printing a traceback."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.kill()
        with self._cond:
            while self._starting and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
