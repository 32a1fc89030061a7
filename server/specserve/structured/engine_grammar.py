"""The grammar the engine compiles for a ``json_schema`` constraint, in one place.

vLLM's xgrammar backend (with the compat patch ``xgrammar_strict_json``) and ``specserve bench
jsonschema`` both build it here, so the bench measures exactly what is served: the schema
rewritten by :mod:`.schema_rewrite` (required names declared), converted by xgrammar with the
backend's options, then the string and separator fixes of :mod:`.strict_json`.

Objects without ``additionalProperties`` stay closed by default, as vLLM and OpenAI's strict mode
have them: a model then writes only the declared keys. JSON Schema itself leaves such objects open;
``SPECSERVE_JSON_OPEN_OBJECTS=1`` in the engine's environment serves that reading (outputs may then
carry keys the schema does not name; on the demo model fewer of them finish within a token budget).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from specserve.structured.schema_rewrite import rewrite_schema_text
from specserve.structured.strict_json import fix_json_ebnf

logger = logging.getLogger(__name__)

OPEN_OBJECTS_ENV = "SPECSERVE_JSON_OPEN_OBJECTS"


def open_objects_enabled() -> bool:
    """Whether objects without ``additionalProperties`` accept undeclared keys (read now)."""
    return os.environ.get(OPEN_OBJECTS_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def json_schema_ebnf(
    schema: str | dict[str, Any], *, open_objects: bool | None = None, **options: Any
) -> str:
    """EBNF for ``schema``; ``options`` are ``xgrammar.Grammar.from_json_schema``'s keywords.
    ``open_objects`` defaults to the environment's switch (:func:`open_objects_enabled`).

    >>> "root ::= ((basic_boolean))" in json_schema_ebnf({"type": "boolean"}, any_whitespace=False)
    True
    """
    import xgrammar as xgr

    opened = open_objects_enabled() if open_objects is None else open_objects
    text = rewrite_schema_text(schema, open_objects=opened)
    try:
        grammar = xgr.Grammar.from_json_schema(text, **options)
    except Exception as err:  # noqa: BLE001 - native code raises several types
        original = schema if isinstance(schema, str) else json.dumps(schema)
        if text == original:
            raise
        # The rewrite must never cost a schema that converts as written: serve it as written.
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        logger.warning("rewritten json schema did not convert; using it as written",
                       extra={"fields": {"error": reason}})
        grammar = xgr.Grammar.from_json_schema(original, **options)
    compact = tuple(options.get("separators") or ()) == (",", ":")
    return fix_json_ebnf(str(grammar), compact)
