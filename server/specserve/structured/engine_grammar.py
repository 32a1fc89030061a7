"""The grammar the engine compiles for a ``json_schema`` constraint, in one place.

vLLM's xgrammar backend (with the compat patch ``xgrammar_strict_json``) and ``specserve bench
jsonschema`` both build it here, so the bench measures exactly what is served: the schema
rewritten by :mod:`.schema_rewrite` (undeclared properties as the schema allows them, required
names declared), converted by xgrammar with the backend's options, then the string and
separator fixes of :mod:`.strict_json`.
"""

from __future__ import annotations

from typing import Any

from specserve.structured.schema_rewrite import rewrite_schema_text
from specserve.structured.strict_json import fix_json_ebnf


def json_schema_ebnf(schema: str | dict[str, Any], **options: Any) -> str:
    """EBNF for ``schema``; ``options`` are ``xgrammar.Grammar.from_json_schema``'s keywords.

    >>> "root ::= ((basic_boolean))" in json_schema_ebnf({"type": "boolean"}, any_whitespace=False)
    True
    """
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(rewrite_schema_text(schema), **options)
    compact = tuple(options.get("separators") or ()) == (",", ":")
    return fix_json_ebnf(str(grammar), compact)
