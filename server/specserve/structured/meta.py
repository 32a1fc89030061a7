"""JSON Schema meta-validation: is the schema itself well formed, and if not, where?

Uses ``jsonschema`` (optional at run time): the draft named by ``$schema``, else 2020-12. The
best-matching error is reported as a JSON pointer to the offending keyword, e.g.
``{"properties": {"age": {"type": "int"}}}`` -> ``("#/properties/age/type", "'int' is not valid
under any of the given schemas")``.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_META_VALIDATORS: dict[type, Any] = {}


def _meta_validator(schema: Any) -> Any:
    from jsonschema import Draft202012Validator, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    with _LOCK:
        if cls not in _META_VALIDATORS:
            _META_VALIDATORS[cls] = cls(cls.META_SCHEMA)
        return _META_VALIDATORS[cls]


def _pointer(path: Any) -> str:
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "#" + "".join(f"/{p}" for p in parts)


def meta_schema_problem(schema: Any) -> tuple[str, str] | None:
    """``(json_pointer, message)`` for the schema's most relevant meta-schema error, else None.

    >>> meta_schema_problem({"properties": {"age": {"type": "int"}}})[0]
    '#/properties/age/type'
    >>> meta_schema_problem({"type": "object"}) is None
    True
    """
    from jsonschema.exceptions import best_match

    if not isinstance(schema, (dict, bool)):
        return "#", "a JSON schema must be an object or a boolean"
    err = best_match(_meta_validator(schema).iter_errors(schema))
    if err is None:
        return None
    message = err.message if len(err.message) <= 200 else err.message[:197] + "..."
    return _pointer(err.absolute_path), message
