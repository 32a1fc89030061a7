"""Strict JSON strings from vLLM's xgrammar backend (xgrammar 0.2.8).

``XgrammarBackend.compile_grammar`` turns ``json`` and ``json_object`` constraints into
``self.compiler.compile_json_schema(spec, any_whitespace=..., separators=...)``. xgrammar's schema
converter lets raw control characters into length-bounded strings (see
:mod:`specserve.structured.strict_json`), so a constrained output can fail a strict JSON parser.

The patch wraps ``XgrammarBackend.__post_init__``: after it has built ``self.compiler``, the
compiler is wrapped in :class:`StrictJsonCompiler`, whose ``compile_json_schema`` builds the
grammar with :func:`specserve.structured.engine_grammar.json_schema_ebnf` (the schema rewritten
so undeclared and required-but-undeclared properties are as the schema allows; string rules made
strict; with ``disable_any_whitespace``'s compact separators, free-form nested values made
compact too, which xgrammar 0.2.8 forgets) and compiles that grammar instead. Every other
compiler method (regex, EBNF, structural tags, caching) goes to the original compiler unchanged.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

from specserve.structured.engine_grammar import default_reading, json_schema_ebnf
from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

MODULE = "vllm.v1.structured_output.backend_xgrammar"

# Wrapped: builds self.compiler (an xgr.GrammarCompiler).
POST_INIT = UpstreamFunction(
    MODULE,
    "XgrammarBackend.__post_init__",
    "d13ee1d00d6cc6effb997348b9e2e5f19a512a2166e7a458c5b172b15dbcf2d8",
)
# Relied on: JSON / JSON_OBJECT requests call self.compiler.compile_json_schema(spec, **kwargs).
COMPILE = UpstreamFunction(
    MODULE,
    "XgrammarBackend.compile_grammar",
    "b1ebb9c0c209160857f2d3282d6caccb463828670cdb771ad937d0cd7e347ee6",
)
UPSTREAM = (POST_INIT, COMPILE)


class StrictJsonCompiler:
    """A ``GrammarCompiler`` stand-in whose JSON-schema grammars have strict JSON strings."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def compile_json_schema(self, schema: Any, **kwargs: Any) -> Any:
        return self._inner.compile_grammar(schema_ebnf(schema, **kwargs))


EBNF_CACHE_SIZE = 512
"""Schemas whose grammar text is kept: a service sees the same few schemas again and again, and
converting one costs milliseconds (tens for large ones) on every request otherwise. The compiled
grammar itself is cached by xgrammar's compiler, keyed by this text."""


@functools.lru_cache(maxsize=EBNF_CACHE_SIZE)
def _cached_ebnf(schema: str, options: tuple[tuple[str, Any], ...], reading: tuple[bool, bool]) -> str:
    """``reading``: the engine's default reading, part of the cache key only
    (:func:`json_schema_ebnf` reads it, and a schema's own keywords, itself)."""
    del reading
    return json_schema_ebnf(schema, **dict(options))


def schema_ebnf(schema: Any, **options: Any) -> str:
    """:func:`json_schema_ebnf`, memoized for schema text and hashable options.

    >>> schema_ebnf('{"type": "boolean"}', any_whitespace=False) == json_schema_ebnf(
    ...     '{"type": "boolean"}', any_whitespace=False)
    True
    """
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    if not isinstance(schema, str):
        return json_schema_ebnf(schema, **options)
    try:
        return _cached_ebnf(schema, key, default_reading())
    except TypeError:  # an unhashable option value
        return json_schema_ebnf(schema, **options)


def _wrap_post_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __post_init__(self: Any) -> None:
        original(self)
        if not isinstance(self.compiler, StrictJsonCompiler):
            self.compiler = StrictJsonCompiler(self.compiler)

    __post_init__.__specserve_strict_json__ = True  # type: ignore[attr-defined]
    return __post_init__


def apply() -> None:
    """Install the strict-JSON compiler wrapper on ``XgrammarBackend`` (idempotent)."""
    module = importlib.import_module(MODULE)
    backend = module.XgrammarBackend
    current = backend.__post_init__
    if getattr(current, "__specserve_strict_json__", False):
        return
    backend.__post_init__ = _wrap_post_init(current)
    logger.debug("installed strict JSON strings for the xgrammar backend")
