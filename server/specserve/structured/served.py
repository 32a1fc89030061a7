"""Compile a constraint the way the engine serves it, and refuse what the engine could not serve.

The engine compiles, for a ``json`` constraint, the grammar of :func:`.engine_grammar.json_schema_ebnf`
(the schema rewritten), with a tokenizer. Converting a schema is not enough to know that compiling
it works: ``{"type": "string", "pattern": "[a-z]{1,200}"}`` converts, yet xgrammar 0.2.8's compiler
stops on an internal check for it. :func:`compile_served` builds the same grammar text and
compiles it with a small stand-in vocabulary (printable ASCII, one character a token): grammar
errors show up the same way, at a small fraction of a full vocabulary's cost.

It also refuses grammars whose language is empty (:func:`admits_a_string`): ``{"$ref": "#"}`` or two
``$ref`` pointing at each other convert to ``root ::= root``, which an engine compiles and then
rejects every token of, failing the request in the middle of generation.

Example:
    >>> admits_a_string('root ::= (("a" root) | ("b"))'), admits_a_string("root ::= ((root))")
    (True, False)
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal

Kind = Literal["json", "regex", "grammar"]

SERVED_JSON_OPTIONS: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":")}
"""``from_json_schema`` options of the engine's default ``--structured-outputs-config``
(``disable_any_whitespace``; see :data:`specserve.engine.process.DEFAULT_STRUCTURED_OUTPUTS`)."""

STANDIN_VOCAB: tuple[str, ...] = tuple(chr(c) for c in range(32, 127))

_LOCAL = threading.local()


class NotServable(Exception):
    """The constraint does not compile the way the engine serves it, or admits no output."""


def _compiler() -> Any:
    """One small-vocabulary ``GrammarCompiler`` per thread. Its cache is on, as the engine's is:
    xgrammar 0.2.8 fails some grammars only on that path (bounded to 32 MiB)."""
    compiler = getattr(_LOCAL, "compiler", None)
    if compiler is None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo(list(STANDIN_VOCAB))
        compiler = _LOCAL.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                               cache_limit_bytes=32 << 20)
    return compiler


def served_grammar(kind: Kind, spec: Any) -> Any:
    """The ``xgrammar.Grammar`` the engine builds for a constraint (before its compile step)."""
    import xgrammar as xgr

    from specserve.structured.compile import looks_like_lark
    from specserve.structured.engine_grammar import json_schema_ebnf

    if kind == "json":
        return xgr.Grammar.from_ebnf(json_schema_ebnf(spec, **SERVED_JSON_OPTIONS))
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    return xgr.Grammar.from_lark(spec) if looks_like_lark(spec) else xgr.Grammar.from_ebnf(spec)


def compile_served(kind: Kind, spec: Any) -> None:
    """Raise :class:`NotServable` (with xgrammar's reason, cleaned) unless ``spec`` compiles as the
    engine compiles it and admits at least one output.

    ``json`` takes the schema (dict or text, with the strict keyword if the request asks for it),
    ``regex`` the pattern, ``grammar`` EBNF or Lark text.
    """
    from specserve.structured.compile import clean_message

    try:
        grammar = served_grammar(kind, spec)
        _compiler().compile_grammar(grammar)
    except Exception as err:  # noqa: BLE001 - native code raises RuntimeError, ValueError, own types
        text = clean_message(err)
        if text.startswith("Check failed"):  # an assertion inside xgrammar, not a message for people
            text = f"the grammar compiler cannot build it (xgrammar: {text.rstrip(': ')})"
        raise NotServable(text) from err
    if not admits_a_string(str(grammar)):
        what = "schema" if kind == "json" else kind
        raise NotServable(f"the {what} admits no output at all (a $ref or rule that only refers "
                          "to itself, with no way out)")


# -- the language of a printed xgrammar grammar is empty? -------------------------------------
# xgrammar prints a grammar one rule a line: ``name ::= body`` with an optional lookahead
# ``(=(...))`` after it. A body is made of ``|``, parenthesised groups, "strings", [classes],
# rule names, Regex("...", json_string=true) terminals, and the suffixes * + ? {m, n} (n = -1: no upper bound).
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|Regex\("(?:[^"\\]|\\.)*"(?:\s*,\s*\w+=\w+)*\))|(?P<cls>\[(?:[^\]\\]|\\.)*\])|(?P<name>[A-Za-z_][\w.-]*)'
    r"|(?P<rep>\{\s*\d+\s*(?:,\s*-?\d*\s*)?\})|(?P<look>\(=)|(?P<op>[()|*+?]))"
)
_RULE = re.compile(r"^([A-Za-z_][\w.-]*)\s*::=\s*(.*)$")


class _Unparsed(Exception):
    """A construct this reader does not know: the grammar is not judged."""


def _tokens(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    body = body.rstrip()
    while pos < len(body):
        match = _TOKEN.match(body, pos)
        if match is None or match.end() == pos:
            raise _Unparsed(body[pos:pos + 20])
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def _min_zero(suffix: tuple[str, str] | None) -> bool:
    """Whether a suffix lets its atom occur zero times."""
    if suffix is None:
        return False
    kind, text = suffix
    if kind == "op":
        return text in "*?"
    return int(text.strip("{} ").split(",")[0]) == 0


class _Reader:
    """Recursive descent over one rule body; ``productive`` is the set of rules known to derive a
    string. Returns whether the body derives a string given that set."""

    def __init__(self, tokens: list[tuple[str, str]], productive: set[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.productive = productive

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def choice(self) -> bool:
        result = self.sequence()
        while self._peek() == ("op", "|"):
            self.i += 1
            result = self.sequence() or result
        return result

    def sequence(self) -> bool:
        result = True
        while (tok := self._peek()) is not None and tok not in (("op", "|"), ("op", ")")):
            result = self.atom() and result
        return result

    def _suffix(self) -> tuple[str, str] | None:
        tok = self._peek()
        if tok is not None and (tok[0] == "rep" or tok in (("op", "*"), ("op", "+"), ("op", "?"))):
            self.i += 1
            return tok
        return None

    def atom(self) -> bool:
        kind, text = self.tokens[self.i]
        self.i += 1
        if kind == "look":  # a lookahead constrains what follows; it derives nothing itself
            self.choice()
            self._close()
            return True
        if kind == "op" and text == "(":
            inner = self.choice()
            self._close()
        elif kind in ("str", "cls"):
            inner = True
        elif kind == "name":
            inner = text in self.productive
        else:
            raise _Unparsed(text)
        suffix = self._suffix()
        return inner or _min_zero(suffix)

    def _close(self) -> None:
        if self._peek() != ("op", ")"):
            raise _Unparsed("unbalanced group")
        self.i += 1


def admits_a_string(ebnf: str) -> bool:
    """Whether the grammar's ``root`` derives at least one (finite) string.

    A grammar this reader cannot parse counts as admitting one: only a sure answer refuses.

    >>> admits_a_string('root ::= ((a))\\na ::= (("x" a))')
    False
    >>> admits_a_string('root ::= ((a{0, 3}))\\na ::= (("x" a))')
    True
    """
    rules: dict[str, list[tuple[str, str]]] = {}
    try:
        for line in ebnf.splitlines():
            match = _RULE.match(line.strip())
            if match is None:
                if line.strip():
                    return True
                continue
            rules[match.group(1)] = _tokens(match.group(2))
        if "root" not in rules:
            return True
        productive: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, tokens in rules.items():
                if name in productive:
                    continue
                reader = _Reader(tokens, productive)
                # The body, then an optional trailing lookahead, which derives nothing.
                if reader.choice():
                    productive.add(name)
                    changed = True
    except (_Unparsed, IndexError, ValueError):
        return True
    return "root" in productive
