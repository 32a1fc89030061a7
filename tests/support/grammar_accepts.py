"""Whether a JSON schema's grammar accepts a text: as served (the engine's grammar) or as xgrammar
alone converts the schema, for tests that show a hole in the one and its absence in the other."""

from __future__ import annotations

import json
from typing import Any

from specserve.structured import engine_grammar

COMPACT = {"any_whitespace": False, "separators": (",", ":")}


def accepts(schema: dict[str, Any], text: str, *, served: bool = True, open_objects: bool | None = None,
            strict: bool | None = None) -> bool:
    """``served``: the grammar the engine compiles (``strict`` and ``open_objects`` as the engine
    reads them when ``None``); else xgrammar's own conversion of ``schema``, with compact
    separators either way."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    if served:
        ebnf = engine_grammar.json_schema_ebnf(schema, strict=strict, open_objects=open_objects,
                                               **COMPACT)
        grammar = xgr.Grammar.from_ebnf(ebnf)
    else:
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), **COMPACT)
    return bool(_is_grammar_accept_string(grammar, text))
