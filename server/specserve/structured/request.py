"""Find the structured-output constraints in an OpenAI-style request body.

Three spellings reach vLLM 0.32's xgrammar backend:

* ``response_format``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
  ``{"type": "json_object"}``, ``{"type": "text"}`` (and vLLM's ``structural_tag``);
* ``structured_outputs``: vLLM's extra field, exactly one of ``json`` / ``regex`` / ``choice`` /
  ``grammar`` / ``json_object`` / ``structural_tag`` plus options;
* the legacy ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields,
  which vLLM 0.32 silently ignores: :func:`normalize_legacy` rewrites them to
  ``structured_outputs`` so they constrain the output as the client expects.

Example:
    >>> [c.param for c in constraints({"guided_regex": "[a-z]+"})]
    ['guided_regex']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from specserve.errors import APIError

ConstraintKind = Literal["json", "regex", "choice", "grammar", "json_object", "structural_tag"]

SO_CONSTRAINTS: tuple[ConstraintKind, ...] = (
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "structural_tag",
)
SO_OPTIONS = frozenset(
    {"disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}
)
LEGACY: dict[str, ConstraintKind] = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "structural_tag")


@dataclass(frozen=True)
class Constraint:
    """One constraint to check: what it is, its value, and the request parameter it came from."""

    kind: ConstraintKind
    value: Any
    param: str


def invalid_structured_output(message: str, param: str) -> APIError:
    """A 400 naming ``param``: the request's structured-output constraint is malformed or unservable."""
    return APIError(400, message, param=param, code="invalid_structured_output")


def _from_response_format(rf: Any) -> list[Constraint]:
    if not isinstance(rf, dict):
        raise invalid_structured_output("response_format must be an object", "response_format")
    rf_type = rf.get("type")
    if rf_type not in RESPONSE_FORMAT_TYPES:
        raise invalid_structured_output(
            f"response_format.type must be one of {list(RESPONSE_FORMAT_TYPES)}, got {rf_type!r}",
            "response_format.type",
        )
    if rf_type == "text":
        return []
    if rf_type == "json_object":
        return [Constraint("json_object", True, "response_format")]
    if rf_type == "structural_tag":
        return [Constraint("structural_tag", rf, "response_format")]
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise invalid_structured_output(
            "response_format.json_schema must be an object with 'name' and 'schema'",
            "response_format.json_schema",
        )
    name = js.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_structured_output(
            "response_format.json_schema.name must be a non-empty string",
            "response_format.json_schema.name",
        )
    if "strict" in js and js["strict"] is not None and not isinstance(js["strict"], bool):
        raise invalid_structured_output(
            "response_format.json_schema.strict must be a boolean",
            "response_format.json_schema.strict",
        )
    if "schema" not in js:
        raise invalid_structured_output(
            "response_format.json_schema.schema is required",
            "response_format.json_schema.schema",
        )
    return [Constraint("json", js["schema"], "response_format.json_schema.schema")]


def _from_structured_outputs(so: Any) -> list[Constraint]:
    if not isinstance(so, dict):
        raise invalid_structured_output("structured_outputs must be an object", "structured_outputs")
    for key in so:
        if key not in SO_CONSTRAINTS and key not in SO_OPTIONS:
            raise invalid_structured_output(f"unknown structured_outputs field {key!r}", f"structured_outputs.{key}")
    present = [k for k in SO_CONSTRAINTS if so.get(k) is not None]
    if len(present) != 1:
        raise invalid_structured_output(
            "structured_outputs needs exactly one of "
            f"{list(SO_CONSTRAINTS)}, got {present or 'none'}",
            "structured_outputs",
        )
    kind = present[0]
    return [Constraint(kind, so[kind], f"structured_outputs.{kind}")]


def constraints(body: dict[str, Any]) -> list[Constraint]:
    """Every constraint in ``body``; raises :class:`APIError` (400) for malformed envelopes."""
    found: list[Constraint] = []
    if body.get("response_format") is not None:
        found += _from_response_format(body["response_format"])
    if body.get("structured_outputs") is not None:
        found += _from_structured_outputs(body["structured_outputs"])
    legacy = [k for k in LEGACY if body.get(k) is not None]
    if len(legacy) > 1:
        raise invalid_structured_output(f"use only one of {legacy}", legacy[1])
    if legacy and body.get("structured_outputs") is not None:
        raise invalid_structured_output(f"use structured_outputs or {legacy[0]}, not both", legacy[0])
    found += [Constraint(LEGACY[k], body[k], k) for k in legacy]
    return found


def asks_strict(body: dict[str, Any]) -> bool:
    """Whether ``body`` asks for OpenAI's strict schema contract
    (``response_format.json_schema.strict: true`` with an object schema).

    >>> asks_strict({"response_format": {"type": "json_schema", "json_schema": {
    ...     "name": "n", "schema": {"type": "object"}, "strict": True}}})
    True
    """
    rf = body.get("response_format")
    if not isinstance(rf, dict) or rf.get("type") != "json_schema":
        return False
    js = rf.get("json_schema")
    return isinstance(js, dict) and js.get("strict") is True and isinstance(js.get("schema"), dict)


def mark_strict(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` whose schema carries the engine's strict keyword
    (:data:`specserve.structured.engine_grammar.STRICT_KEYWORD`): the engine then serves objects
    with only their declared names, in the declared order, as OpenAI's strict mode promises.
    ``body`` itself when it does not ask for that (:func:`asks_strict`).

    >>> body = {"response_format": {"type": "json_schema", "json_schema": {
    ...     "name": "n", "schema": {"type": "object"}, "strict": True}}}
    >>> mark_strict(body)["response_format"]["json_schema"]["schema"]
    {'type': 'object', 'x-specserve-strict': True}
    """
    from specserve.structured.engine_grammar import STRICT_KEYWORD

    if not asks_strict(body):
        return body
    rf = body["response_format"]
    js = rf["json_schema"]
    schema = {**js["schema"], STRICT_KEYWORD: True}
    return {**body, "response_format": {**rf, "json_schema": {**js, "schema": schema}}}


def normalize_legacy(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` with ``guided_*`` fields moved into ``structured_outputs``.

    >>> normalize_legacy({"guided_choice": ["a", "b"], "model": "m"})
    {'model': 'm', 'structured_outputs': {'choice': ['a', 'b']}}
    """
    legacy = [k for k in LEGACY if body.get(k) is not None]
    if not legacy:
        return body
    out = {k: v for k, v in body.items() if k not in LEGACY and k not in _LEGACY_OPTIONS}
    so: dict[str, Any] = {}
    for key in legacy:
        value = body[key]
        if key == "guided_json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # precheck reports it
        so[LEGACY[key]] = value
    if body.get("guided_whitespace_pattern") is not None:
        so["whitespace_pattern"] = body["guided_whitespace_pattern"]
    out["structured_outputs"] = so
    return out


_LEGACY_OPTIONS = frozenset({"guided_decoding_backend", "guided_whitespace_pattern"})
