"""Strict JSON strings in grammars that xgrammar 0.2.8 derives from JSON schemas.

JSON (RFC 8259, section 7) forbids raw control characters U+0000..U+001F inside strings; a strict
parser (``json.loads(s, strict=True)``) rejects them. xgrammar 0.2.8 gets this right for plain
strings (``[^\\0-\\x1f\\"\\\\\\r\\n]``) but, for a string with ``minLength``/``maxLength`` (and for
``propertyNames`` with length bounds), it emits a per-character rule ``[^\\"\\\\\\r\\n]``: every
control character except CR and LF slips through, so constrained outputs such as ``"a\\x01b"``
fail to parse.

:func:`strict_json_ebnf` rewrites the printed grammar (xgrammar's EBNF, which it parses back
losslessly) so those character rules exclude U+0000..U+001F too. Only rules whose whole body is
that character class (optionally ``"" |`` it, as bounded repetitions print) are touched; string
literals and regex-derived rules (``Regex(..., json_string=true)``, already strict) are left alone.

Like xgrammar's own rule, the rewritten one has no escape sequences, so a length-bounded string
cannot hold ``\\"`` or ``\\n`` (a few valid instances are refused). Adding them as an alternation
inside the bounded repetition leaves xgrammar's fast path for a single character class and made
every mask fill about 40 times slower, so the rule stays one class.

Example:
    >>> strict_json_ebnf('root_name_characters ::= (([^\\\\"\\\\\\\\\\\\r\\\\n]))')
    'root_name_characters ::= (([^\\\\0-\\\\x1f\\\\"\\\\\\\\]))'
"""

from __future__ import annotations

import re

# The character class as xgrammar prints it: [^\"\\\r\n]
LOOSE_CLASS = '[^\\"\\\\\\r\\n]'
# What a JSON string character must be (besides an escape): not a quote, backslash or control.
STRICT_CLASS = '[^\\0-\\x1f\\"\\\\]'

_RULE = re.compile(r"^(?P<head>[A-Za-z_][A-Za-z0-9_]* ::= )(?P<body>.*)$")
# A rule body made only of the loose class, optionally alternated with the empty string.
_BODY_ONLY_LOOSE = re.compile(
    r'^\(*\s*(?:""\s*\|\s*)?\(*' + re.escape(LOOSE_CLASS) + r"\)*\s*\)*$"
)


def strict_json_ebnf(ebnf: str) -> str:
    """Return ``ebnf`` with every loose JSON-string character rule made strict (see module doc)."""
    out: list[str] = []
    for line in ebnf.split("\n"):
        m = _RULE.match(line)
        if m is not None and _BODY_ONLY_LOOSE.match(m.group("body")):
            line = m.group("head") + m.group("body").replace(LOOSE_CLASS, STRICT_CLASS)
        out.append(line)
    return "\n".join(out)


# xgrammar's free-form JSON rules (values of untyped or property-less schemas).
FREE_FORM_RULES = frozenset(
    {"basic_array", "basic_object", "basic_array_items", "basic_object_properties"}
)


def compact_free_form(ebnf: str) -> str:
    """Make xgrammar's free-form JSON rules use the compact separators ``,`` and ``:``.

    With ``separators=(",", ":")`` xgrammar 0.2.8 still writes ``", "`` and ``": "`` into
    ``basic_object`` / ``basic_array`` (used for ``{"type": "object"}`` without properties and for
    untyped values), so compact JSON inside such values is rejected while the surrounding
    object is compact. Call this only for grammars built with compact separators.

    >>> compact_free_form('basic_array_items ::= ((", " basic_any))')
    'basic_array_items ::= (("," basic_any))'
    """
    out: list[str] = []
    for line in ebnf.split("\n"):
        name = line.split(" ::= ", 1)[0]
        if name in FREE_FORM_RULES:
            line = line.replace('", "', '","').replace('": "', '":"')
        out.append(line)
    return "\n".join(out)


def fix_json_ebnf(ebnf: str, compact: bool) -> str:
    """Both fixes: strict strings always, compact free-form values when ``compact`` is true."""
    fixed = strict_json_ebnf(ebnf)
    return compact_free_form(fixed) if compact else fixed


def has_loose_strings(ebnf: str) -> bool:
    """True if ``ebnf`` still has a JSON-string character rule that admits control characters.

    >>> has_loose_strings('c ::= (([^\\\\"\\\\\\\\\\\\r\\\\n]))')
    True
    >>> has_loose_strings(strict_json_ebnf('c ::= (([^\\\\"\\\\\\\\\\\\r\\\\n]))'))
    False
    """
    return LOOSE_CLASS in ebnf
