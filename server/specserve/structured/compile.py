"""Check that a constraint compiles, with a time limit and a bounded cache of answers.

The check is tokenizer-free: ``xgrammar.Grammar.from_json_schema`` / ``from_regex`` /
``from_ebnf`` / ``from_lark`` build the grammar an engine would compile, which is where invalid
or unsupported schemas fail. xgrammar imports torch (seconds), so it is imported lazily, once;
:func:`warm_up` starts that import in the background at gateway start. Without xgrammar (the slim
gateway image) the check falls back to JSON Schema meta-validation (when ``jsonschema`` is
installed) or accepts.

Compiles run on a small thread pool (xgrammar releases the GIL while compiling, so the event
loop stays responsive) and are abandoned after ``compile_timeout_s``; the refusal is cached, so
repeating a slow schema costs nothing. Limits checked beforehand (:mod:`.limits`) keep honest
compiles far below the timeout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

logger = logging.getLogger(__name__)

Kind = Literal["json", "regex", "grammar"]

_XGR_LOCK = threading.Lock()
_XGR: dict[str, Any] = {}
_POOL_LOCK = threading.Lock()
_POOL: dict[str, ThreadPoolExecutor] = {}
# xgrammar prefixes messages with "[hh:mm:ss] /path/file.cc:123: "
_LOG_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")


class CompileRefused(Exception):
    """The constraint does not compile (message says why)."""


class CompileBusy(Exception):
    """Every compile worker is busy (with earlier slow constraints); try again shortly."""


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


def warm_up() -> threading.Thread:
    """Import xgrammar in a background thread so the first request does not wait for it."""
    thread = threading.Thread(target=load_xgrammar, name="xgrammar-import", daemon=True)
    thread.start()
    return thread


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if "pool" not in _POOL:
            _POOL["pool"] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-check")
        return _POOL["pool"]


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


def _compile(kind: Kind, spec: Any) -> None:
    """Raise :class:`CompileRefused` if ``spec`` is malformed or does not compile."""
    if kind == "json" and importlib.util.find_spec("jsonschema") is not None:
        from specserve.structured.meta import meta_schema_problem

        problem = meta_schema_problem(spec)
        if problem is not None:
            raise CompileRefused(f"invalid schema at '{problem[0]}': {problem[1]}")
    xgr = load_xgrammar()
    if xgr is None:
        return
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(
                json.dumps(spec), any_whitespace=False, separators=(",", ":")
            )
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        elif looks_like_lark(spec):
            xgr.Grammar.from_lark(spec)
        else:
            xgr.Grammar.from_ebnf(spec)
    except Exception as err:  # native code raises RuntimeError, ValueError and its own types
        raise CompileRefused(clean_message(err)) from err


class GrammarChecker:
    """Compile-checks constraints; remembers the answer per content hash (LRU, bounded)."""

    def __init__(
        self,
        cache_size: int = 1024,
        timeout_s: float = 3.0,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._executor = executor  # None: the process-wide pool of two workers
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str | None] = OrderedDict()

    @staticmethod
    def key(kind: Kind, spec: Any) -> str:
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        return hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()

    def _remember(self, key: str, verdict: str | None) -> None:
        with self._lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def cached(self, kind: Kind, spec: Any) -> tuple[bool, str | None]:
        """``(hit, refusal)`` for a previously checked constraint."""
        key = self.key(kind, spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True, self._cache[key]
        return False, None

    def check(self, kind: Kind, spec: Any) -> None:
        """Raise :class:`CompileRefused` unless ``spec`` compiles within the time limit."""
        key = self.key(kind, spec)
        hit, refusal = self.cached(kind, spec)
        if not hit:
            refusal = self._run(kind, spec)  # CompileBusy is not an answer: not remembered
            self._remember(key, refusal)
        if refusal is not None:
            raise CompileRefused(refusal)

    def _run(self, kind: Kind, spec: Any) -> str | None:
        load_xgrammar()  # import time (seconds, once) is not part of the compile limit
        future = (self._executor or _pool()).submit(_compile, kind, spec)
        try:
            future.result(timeout=self.timeout_s)
        except FutureTimeout:
            if future.cancel():  # never started: the workers are tied up by earlier compiles
                raise CompileBusy(f"no compile worker free within {self.timeout_s:g} s") from None
            logger.warning(
                "grammar compile exceeded its time limit",
                extra={"fields": {"kind": kind, "timeout_s": self.timeout_s}},
            )
            return f"compiling the {kind} constraint took longer than {self.timeout_s:g} s"
        except CompileRefused as err:
            return str(err)
        return None
