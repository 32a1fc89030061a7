"""Check that a constraint compiles, with a time limit and a bounded cache of answers.

The check compiles the grammar the engine serves (:mod:`.served`: for a schema, the rewritten
schema's grammar), with a small stand-in vocabulary, and refuses grammars that admit no output.
xgrammar imports torch (seconds), so it is imported lazily, once (the gateway starts that import
and its compile workers in the background: :meth:`.precheck.SchemaPrecheck.warm_up`). Without
xgrammar (the slim gateway image) the check falls back to JSON Schema meta-validation (when
``jsonschema`` is installed) or accepts.

Compiles run in worker processes (:mod:`.workers`), each within the time its request has left;
one that runs over is killed and its worker replaced, and the refusal is cached, so repeating a
slow schema costs nothing. Limits checked beforehand (:mod:`.limits`) keep honest compiles far
below the timeout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Literal

from specserve.structured.workers import CompileWorkers, WorkersBusy, compile_job

logger = logging.getLogger(__name__)

Kind = Literal["json", "regex", "grammar"]

_XGR_LOCK = threading.Lock()
_XGR: dict[str, Any] = {}
_POOL_LOCK = threading.Lock()
_POOL: dict[str, CompileWorkers] = {}
COMPILE_WORKERS = 2
"""Compile worker processes per gateway (or engine front end)."""
# xgrammar prefixes messages with "[hh:mm:ss] /path/file.cc:123: "
_LOG_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")


class CompileRefused(Exception):
    """The constraint does not compile (message says why)."""


class CompileBusy(Exception):
    """Every compile worker is busy (with earlier slow constraints); try again shortly."""


class CompileThrottled(CompileBusy):
    """The same client already has its share of compiles running; try again shortly."""


def has_xgrammar() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


def load_xgrammar() -> Any:
    """Import xgrammar once (thread-safe); None if it is not installed."""
    with _XGR_LOCK:
        if "mod" not in _XGR:
            if not has_xgrammar():
                _XGR["mod"] = None
            else:
                import xgrammar

                _XGR["mod"] = xgrammar
        return _XGR["mod"]


def clean_message(err: BaseException) -> str:
    """xgrammar's error text without its source-location prefix.

    >>> clean_message(ValueError('[06:37:55] /project/cpp/x.cc:49: Unsupported type "strin"'))
    'Unsupported type "strin"'
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _LOG_PREFIX.sub("", text)


def looks_like_lark(grammar: str) -> bool:
    """EBNF (xgrammar/GBNF) rules use ``::=``; Lark rules use ``:``.

    >>> looks_like_lark('root ::= "a"'), looks_like_lark('start: "a"')
    (False, True)
    """
    return "::=" not in grammar


def _meta_check(kind: Kind, spec: Any) -> None:
    """JSON Schema meta-validation (when ``jsonschema`` is installed): names the bad keyword's place."""
    if kind == "json" and importlib.util.find_spec("jsonschema") is not None:
        from specserve.structured.meta import meta_schema_problem

        problem = meta_schema_problem(spec)
        if problem is not None:
            raise CompileRefused(f"invalid schema at '{problem[0]}': {problem[1]}")


class GrammarChecker:
    """Compile-checks constraints; remembers the answer per content hash (LRU, bounded).

    Compiles run in :class:`~specserve.structured.workers.CompileWorkers` processes (``workers``;
    without it the process-wide :func:`shared_workers`, the engine's), each within the time left
    to its request; one sender has at most ``per_owner`` compiles running at once, so a client
    sending slow schemas ties up at most that many workers.
    """

    def __init__(
        self,
        cache_size: int = 1024,
        timeout_s: float = 3.0,
        workers: CompileWorkers | None = None,
        per_owner: int = 1,
    ) -> None:
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.per_owner = per_owner
        self._workers = workers
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self._owners: dict[str, int] = {}
        self._owner_free = threading.Condition(self._lock)

    @staticmethod
    def key(kind: Kind, spec: Any) -> str:
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        if kind == "json":  # the engine's default reading is part of the grammar served
            from specserve.structured.engine_grammar import strict_by_default

            text = f"{strict_by_default()}\0{text}"
        return hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()

    def _remember(self, key: str, verdict: str | None) -> None:
        with self._lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def remember(self, kind: Kind, spec: Any, refusal: str | None) -> None:
        """Keep an answer found elsewhere (the engine's in-process fallback) for later checks."""
        self._remember(self.key(kind, spec), refusal)

    def cached(self, kind: Kind, spec: Any) -> tuple[bool, str | None]:
        """``(hit, refusal)`` for a previously checked constraint."""
        key = self.key(kind, spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True, self._cache[key]
        return False, None

    def prepare(self, timeout_s: float = 300.0) -> None:
        """Import xgrammar and wait for the compile workers to start (once; seconds)."""
        if load_xgrammar() is not None:
            (self._workers or shared_workers()).wait_started(timeout_s)

    def check(self, kind: Kind, spec: Any, *, deadline: float | None = None, owner: str = "") -> None:
        """Raise :class:`CompileRefused` unless ``spec`` compiles, as the engine serves it, before
        ``deadline`` (``time.monotonic()``; default: ``timeout_s`` from now).

        :class:`CompileBusy` when no worker frees up in time, :class:`CompileThrottled` when
        ``owner`` already has ``per_owner`` compiles running until the deadline (neither is an
        answer about the constraint: not remembered).
        """
        hit, refusal = self.cached(kind, spec)
        if not hit:
            _meta_check(kind, spec)
            deadline = time.monotonic() + self.timeout_s if deadline is None else deadline
            refusal = self._run(kind, spec, deadline, owner)
            self._remember(self.key(kind, spec), refusal)
        if refusal is not None:
            raise CompileRefused(refusal)

    def _run(self, kind: Kind, spec: Any, deadline: float, owner: str) -> str | None:
        if load_xgrammar() is None:  # import time (seconds, once) is not part of the limit
            return None
        with self._owner_free:
            while self._owners.get(owner, 0) >= self.per_owner:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CompileThrottled(
                        f"{self.per_owner} grammar compile(s) of this client are already running")
                self._owner_free.wait(remaining)
            self._owners[owner] = self._owners.get(owner, 0) + 1
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # spent on this request's own checks: an answer, not remembered
                raise CompileRefused(f"checking it took longer than {self.timeout_s:g} s")
            workers = self._workers or shared_workers()
            try:
                refusal = workers.run(compile_job, (kind, spec), timeout_s=remaining)
            except WorkersBusy as err:
                raise CompileBusy(f"no compile worker free within {self.timeout_s:g} s") from err
        finally:
            with self._owner_free:
                left = self._owners.pop(owner) - 1
                if left:
                    self._owners[owner] = left
                self._owner_free.notify_all()
        if refusal is not None and refusal.startswith("compiling it took longer"):
            logger.warning("grammar compile exceeded its time limit; worker replaced",
                           extra={"fields": {"kind": kind, "timeout_s": round(remaining, 3)}})
        return refusal


def shared_workers() -> CompileWorkers:
    """The process-wide compile workers of an engine front end (started on first use); the gateway
    holds its own (:class:`~specserve.structured.precheck.SchemaPrecheck`)."""
    with _POOL_LOCK:
        if "workers" not in _POOL:
            _POOL["workers"] = CompileWorkers(size=COMPILE_WORKERS)
        return _POOL["workers"]
