"""Float enum/const values: accepted as JSON writes them (xgrammar renders them with 17 digits)."""

from __future__ import annotations

from typing import Any

from support.grammar_accepts import accepts

from specserve.structured import engine_grammar

SCHEMA = {
    "type": "object",
    "properties": {"limit": {"type": "number", "enum": [0.1, 0.4, 2]}, "ratio": {"const": 0.7},
                   "name": {"enum": ["0.10000000000000001"]}},
    "required": ["limit", "ratio", "name"],
}


def _accepts(schema: dict[str, Any], text: str, *, served: bool = True) -> bool:
    return accepts(schema, text, served=served)


def test_short_and_long_spellings_are_accepted_and_nothing_else() -> None:
    name = '"name":"0.10000000000000001"'
    short = '{"limit":0.1,"ratio":0.7,' + name + "}"
    long = '{"limit":0.10000000000000001,"ratio":0.69999999999999996,' + name + "}"
    assert not _accepts(SCHEMA, short, served=False)  # xgrammar alone: only the 17-digit form
    assert _accepts(SCHEMA, long, served=False)
    assert _accepts(SCHEMA, short) and _accepts(SCHEMA, long)
    assert _accepts(SCHEMA, '{"limit":2,"ratio":0.7,' + name + "}")
    for bad in ('{"limit":0.2,"ratio":0.7,' + name + "}", '{"limit":0.1,"ratio":0.8,' + name + "}",
                '{"limit":0.1,"ratio":0.7,"name":"0.1"}'):  # a string enum is left exactly as it is
        assert not _accepts(SCHEMA, bad), bad


def test_unparsable_schema_text_leaves_the_grammar_alone() -> None:
    assert engine_grammar.shortest_float_literals('root ::= ("1")', "{not json") == 'root ::= ("1")'
