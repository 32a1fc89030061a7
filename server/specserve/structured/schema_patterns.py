"""String rewrites of a schema node before xgrammar: ``pattern`` and ``format`` read as JSON
Schema reads them (part of :func:`.schema_merge.normalize_schema`; see
``docs/structured-outputs.md``).

* **pattern over format**: next to a ``pattern``, ``format`` is dropped (xgrammar enforces one
  and picks the format; the pattern is what every validator asserts);
* **calendar dates**: ``format: date``/``date-time`` become a pattern with each month's day count;
* **length-bounded patterns**: ``minLength``/``maxLength`` folded into a one-class repeat;
* **patterns match anywhere**: ``.*`` added on each unanchored side.
"""

from __future__ import annotations

import re
from typing import Any

from specserve.structured.formats import exact_format_pattern


def pattern_over_format(node: dict[str, Any]) -> bool:
    """Drop ``format`` next to a ``pattern``: xgrammar enforces only one of them and picks the
    format, so the pattern (which every validator asserts; ``format`` is asserted only where a
    validator is asked to) was ignored: ``"ftp://x"`` passed ``{"format": "uri", "pattern":
    "^https://"}``.

    >>> node = {"type": "string", "format": "uri", "pattern": "^https://"}
    >>> pattern_over_format(node), node
    (True, {'type': 'string', 'pattern': '^https://'})
    >>> pattern_over_format({"type": "string", "format": "uri"})
    False
    """
    if not isinstance(node.get("pattern"), str) or not isinstance(node.get("format"), str):
        return False
    del node["format"]
    return True


def exact_format(node: dict[str, Any]) -> bool:
    """Replace a ``date``/``date-time`` format by a pattern with the calendar's day counts
    (xgrammar's own format rules accept 31 days in every month). Left alone next to a
    ``pattern`` or a length bound: xgrammar would then enforce only one of them.

    >>> node = {"type": "string", "format": "date"}
    >>> exact_format(node), "format" in node, node["pattern"].startswith("^")
    (True, False, True)
    """
    fmt = node.get("format")
    if not isinstance(fmt, str) or {"pattern", "minLength", "maxLength"} & node.keys():
        return False
    pattern = exact_format_pattern(fmt)
    if pattern is None:
        return False
    del node["format"]
    node["pattern"] = pattern
    return True


# ``^ATOM*$``, ``^ATOM+$``, ``^ATOM{m}$``, ``^ATOM{m,}$``, ``^ATOM{m,n}$`` for one character class
# (or escape class, or ``.``).
_REPEATED_ATOM = re.compile(
    r"^\^(?P<atom>\[(?:\\.|[^\]\\])+\]|\\[dwsDWS]|\.)"
    r"(?:(?P<op>[*+])|\{(?P<lo>\d+)(?P<comma>,(?P<hi>\d*))?\})\$$"
)


def bounded_pattern(node: dict[str, Any]) -> bool:
    """Fold ``minLength``/``maxLength`` into a pattern that repeats one character class:
    xgrammar ignores length bounds next to a ``pattern``.

    >>> node = {"type": "string", "pattern": "^[0-9a-f]*$", "minLength": 32, "maxLength": 32}
    >>> bounded_pattern(node), node
    (True, {'type': 'string', 'pattern': '^[0-9a-f]{32,32}$'})
    >>> bounded_pattern({"pattern": "^[a-z]+$", "maxLength": 0})  # no string fits both
    False
    """
    pattern = node.get("pattern")
    low, high = node.get("minLength"), node.get("maxLength")
    if not isinstance(pattern, str) or (low is None and high is None):
        return False
    if not all(x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0)
               for x in (low, high)):
        return False
    m = _REPEATED_ATOM.match(pattern)
    if m is None:
        return False
    if m.group("op"):
        p_low, p_high = (0 if m.group("op") == "*" else 1), None
    else:
        p_low = int(m.group("lo"))
        p_high = None if m.group("comma") and not m.group("hi") else int(m.group("hi") or p_low)
    lo = max(p_low, low or 0)
    hi = min(x for x in (p_high, high) if x is not None) if (p_high, high) != (None, None) else None
    if hi is not None and hi < lo:
        return False
    node["pattern"] = f"^{m.group('atom')}{{{lo},{'' if hi is None else hi}}}$"
    node.pop("minLength", None)
    node.pop("maxLength", None)
    return True


def top_level_alternation(pattern: str) -> bool:
    """Whether ``pattern`` has a ``|`` outside every group and character class.

    >>> top_level_alternation("a|b"), top_level_alternation("(a|b)c"), top_level_alternation("[|]")
    (True, False, False)
    """
    depth, in_class, escaped = 0, False, False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return True
    return False


def search_pattern(pattern: str) -> str:
    r"""The full-match regex for JSON Schema's ``pattern`` (which matches anywhere in the string:
    ``"a"`` accepts ``"xay"``); xgrammar matches patterns against the whole string.

    >>> search_pattern("/$"), search_pattern("^[a-z]+$"), search_pattern(r"\w+")
    ('.*/$', '^[a-z]+$', '.*\\w+.*')
    >>> search_pattern(r"a\$")  # an escaped dollar is a character, not an anchor
    '.*a\\$.*'
    >>> search_pattern("a|b")  # anchors may differ per branch: left as written
    'a|b'
    """
    if not pattern or top_level_alternation(pattern):
        return pattern
    backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    ends = pattern.endswith("$") and backslashes % 2 == 0
    return ("" if pattern.startswith("^") else ".*") + pattern + ("" if ends else ".*")


def search_patterns(node: dict[str, Any]) -> None:
    """Give ``pattern`` and ``patternProperties`` JSON Schema's match-anywhere meaning."""
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        node["pattern"] = search_pattern(pattern)
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict):
        renamed = {search_pattern(k): v for k, v in patterns.items()}
        if len(renamed) == len(patterns):
            node["patternProperties"] = renamed
