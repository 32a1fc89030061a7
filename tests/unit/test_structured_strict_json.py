"""Strict JSON strings: the grammar rewrite and the vLLM compat patch that applies it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from specserve.structured.strict_json import LOOSE_CLASS, STRICT_CLASS, has_loose_strings, strict_json_ebnf

LENGTH_BOUNDED = [
    {"type": "string", "minLength": 1, "maxLength": 20},
    {"type": "string", "maxLength": 3},
    {"type": "object", "propertyNames": {"minLength": 2}},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}}},
]


def _accepts(grammar: object, text: str) -> bool:
    from xgrammar.testing import _is_grammar_accept_string

    return bool(_is_grammar_accept_string(grammar, text))


def _value_text(schema: dict, inner: str) -> str:
    if schema.get("type") == "string":
        return json.dumps(inner, ensure_ascii=False).replace("\\u0001", "\x01")
    if "propertyNames" in schema:
        return '{"' + inner + '":1}'
    return '{"a":"' + inner + '"}'


def test_rewrite_only_touches_whole_class_rules() -> None:
    ebnf = "\n".join(
        [
            f"r1 ::= (({LOOSE_CLASS}))",
            f'r2 ::= ("" | ({LOOSE_CLASS}))',
            f'r3 ::= (("x" {LOOSE_CLASS}))',
            'r4 ::= (("\\"" r1 "\\""))',
        ]
    )
    out = strict_json_ebnf(ebnf).split("\n")
    assert LOOSE_CLASS not in out[0] and LOOSE_CLASS not in out[1]
    assert out[2] == f'r3 ::= (("x" {LOOSE_CLASS}))'
    assert out[3] == 'r4 ::= (("\\"" r1 "\\""))'


def test_rewritten_rules_stay_one_character_class() -> None:
    # xgrammar fills masks for a bounded repetition of one character class on a fast path. An
    # alternation there (e.g. a class *or an escape sequence*) was tried and made each mask fill
    # about 40 times slower (21 vs 840 microseconds per token on 60 MaskBench schemas), so a
    # length-bounded string keeps refusing escapes rather than slowing every constrained step.
    out = strict_json_ebnf(f'r ::= ("" | ({LOOSE_CLASS}))')
    assert out == f'r ::= ("" | ({STRICT_CLASS}))'


@pytest.mark.parametrize("schema", LENGTH_BOUNDED)
def test_xgrammar_admits_control_chars_and_the_rewrite_removes_them(schema: dict) -> None:
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    ebnf = str(grammar)
    # The upstream defect this module exists for; if xgrammar fixes it, this fails as a reminder.
    assert has_loose_strings(ebnf)
    raw = _value_text(schema, "a\x01")
    clean = _value_text(schema, "ab")
    assert _accepts(grammar, raw)
    fixed = xgr.Grammar.from_ebnf(strict_json_ebnf(ebnf))
    assert not has_loose_strings(str(fixed))
    assert not _accepts(fixed, raw)
    assert _accepts(fixed, clean)


def test_compat_patch_wraps_backend_compiler() -> None:
    import xgrammar as xgr

    from specserve_vllm.compat import PATCHES, xgrammar_strict_json as patch

    assert "xgrammar_strict_json" in PATCHES
    patch.apply()
    patch.apply()  # idempotent
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    assert getattr(XgrammarBackend.__post_init__, "__specserve_strict_json__", False)

    calls: list[str] = []

    class FakeInner:
        def compile_grammar(self, grammar: str) -> str:
            calls.append(grammar)
            return "compiled"

        def compile_regex(self, regex: str) -> str:
            return "regex:" + regex

    compiler = patch.StrictJsonCompiler(FakeInner())
    out = compiler.compile_json_schema(
        '{"type": "string", "maxLength": 5}', any_whitespace=False, separators=(",", ":")
    )
    assert out == "compiled"
    assert not has_loose_strings(calls[0])
    xgr.Grammar.from_ebnf(calls[0])  # still a valid grammar
    compiler.compile_json_schema(
        '{"type": "object", "properties": {"p": {"type": "object"}}}',
        any_whitespace=False,
        separators=(",", ":"),
    )
    free_form = [line for line in calls[1].split("\n") if line.startswith("basic_object")]
    assert free_form and all('", "' not in line for line in free_form)
    # The schema is rewritten first (schema_rewrite): a required but undeclared name is declared.
    compiler.compile_json_schema(
        '{"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}',
        any_whitespace=False,
        separators=(",", ":"),
    )
    assert '"\\"b\\""' in calls[2]
    assert compiler.compile_regex("a+") == "regex:a+"  # everything else passes through


def test_compat_patch_relies_on_compile_json_schema() -> None:
    from specserve_vllm.compat import xgrammar_strict_json as patch

    src = patch.COMPILE.source()
    # The patch relies on JSON and JSON_OBJECT going through self.compiler.compile_json_schema.
    assert src.count("self.compiler.compile_json_schema(") == 2


def test_free_form_values_use_compact_separators() -> None:
    import xgrammar as xgr

    from specserve.structured.strict_json import compact_free_form, fix_json_ebnf

    schema = {"type": "object", "properties": {"p": {"type": "object"}}, "required": ["p"]}
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    compact_text = '{"p":{"a":1,"b":[1,2]}}'
    spaced_text = '{"p":{"a": 1, "b": [1, 2]}}'
    # xgrammar 0.2.8 puts spaced separators inside free-form values despite separators=(",", ":")
    assert not _accepts(grammar, compact_text)
    fixed = xgr.Grammar.from_ebnf(fix_json_ebnf(str(grammar), compact=True))
    assert _accepts(fixed, compact_text)
    assert not _accepts(fixed, spaced_text)
    untouched = 'root ::= (("{" "\\"a\\"" ": " basic_any "}"))'
    assert compact_free_form(untouched) == untouched


def test_compat_patch_converts_each_schema_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from specserve.engine import settings
    from specserve.structured import engine_grammar
    from specserve_vllm.compat import xgrammar_strict_json as patch

    conversions: list[str] = []
    real = engine_grammar.json_schema_ebnf

    def counting(schema: Any, **options: Any) -> str:
        conversions.append(schema)
        return real(schema, **options)

    monkeypatch.setattr(patch, "json_schema_ebnf", counting)
    patch._cached_ebnf.cache_clear()
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    compact = {"any_whitespace": False, "separators": (",", ":")}
    first = patch.schema_ebnf(schema, **compact)
    assert patch.schema_ebnf(schema, **compact) == first and len(conversions) == 1
    assert patch.schema_ebnf(schema, any_whitespace=True) != first and len(conversions) == 2
    # The default reading is part of the key: open objects give the other grammar.
    assert "additional" not in first
    with settings.override(json_objects="open"):
        opened = patch.schema_ebnf(schema, **compact)
        assert opened != first and "additional" in opened and len(conversions) == 3
        # A schema's own keywords win over the default reading.
        marked = schema[:-1] + f', "{engine_grammar.OBJECTS_KEYWORD}": "closed"}}'
        assert "additional" not in patch.schema_ebnf(marked, **compact)
        strict = schema[:-1] + f', "{engine_grammar.STRICT_KEYWORD}": true}}'
        assert "additional" not in patch.schema_ebnf(strict, **compact)
    patch._cached_ebnf.cache_clear()
