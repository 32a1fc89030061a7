"""The readings of a json_schema: closed objects by default, open on request, strict in order."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from specserve.engine import settings
from specserve.structured.engine_grammar import OBJECTS_KEYWORD, STRICT_KEYWORD
from support.grammar_accepts import accepts

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
          "required": ["a"]}
EXTRA = '{"a":1,"c":2}'
REORDERED = '{"b":"x","a":1}'


@pytest.fixture(autouse=True)
def defaults() -> Iterator[None]:
    with settings.override(json_mode="schema", json_objects="closed"):
        yield


def test_the_default_takes_declared_keys_only_in_any_order() -> None:
    assert accepts(SCHEMA, REORDERED)
    assert not accepts(SCHEMA, EXTRA)


def test_a_schema_that_allows_more_keys_says_so() -> None:
    assert accepts({**SCHEMA, "additionalProperties": True}, EXTRA)
    assert accepts({**SCHEMA, "additionalProperties": {"type": "integer"}}, EXTRA)
    assert not accepts({**SCHEMA, "additionalProperties": {"type": "string"}}, EXTRA)


def test_a_request_opts_into_the_open_reading() -> None:
    opened = {**SCHEMA, OBJECTS_KEYWORD: "open"}
    assert accepts(opened, EXTRA) and accepts(opened, REORDERED)
    assert not accepts(opened, '{"c":2}')  # required keys stay required


def test_the_server_opts_into_the_open_reading() -> None:
    with settings.override(json_objects="open"):
        assert accepts(SCHEMA, EXTRA)
        assert not accepts({**SCHEMA, OBJECTS_KEYWORD: "closed"}, EXTRA)


def test_strict_keeps_the_declared_order() -> None:
    strict = {**SCHEMA, STRICT_KEYWORD: True}
    assert accepts(strict, '{"a":1,"b":"x"}')
    assert not accepts(strict, REORDERED) and not accepts(strict, EXTRA)
    assert not accepts({**strict, OBJECTS_KEYWORD: "open"}, EXTRA)
