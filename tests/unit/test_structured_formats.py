"""Calendar-exact ``date`` / ``date-time`` patterns: Python's calendar, xgrammar's own time rule."""

from __future__ import annotations

import calendar
import datetime
import itertools
import re
from typing import Any

import pytest

from specserve.structured.formats import exact_format_pattern

YEARS = ["0000", "0004", "0100", "0400", "1900", "2000", "2023", "2024", "2100", "2400", "9999"]
DATE = exact_format_pattern("date") or ""
DATE_TIME = exact_format_pattern("date-time") or ""

# Each part of xgrammar's date-time time rule, with values on both sides of every bound.
HOURS = ["00", "09", "10", "19", "20", "23", "24", "30", "0", "1a"]
MINUTES = ["00", "59", "60", "5"]
SECONDS = ["00", "59", "60", "61", "70"]
FRACTIONS = ["", ".", ".0", ".123456789", ",5", ".5.5"]
OFFSETS = ["Z", "z", "", "+00:00", "-23:59", "+24:00", "+05:60", "+0530", "+05", "Z+01:00"]


def _valid_date(text: str) -> bool:
    """What ``datetime.date.fromisoformat`` says, with year 0000 read as 2000.

    The Gregorian calendar repeats every 400 years, so 0000 (proleptic) has 2000's calendar;
    Python's dates start at year 1.
    """
    if text.startswith("0000"):
        text = "2000" + text[4:]
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _grid(years: list[str]) -> list[str]:
    """Every ``YYYY-MM-DD`` for months 00..13 and days 00..32 of each year."""
    return [f"{y}-{m:02d}-{d:02d}" for y in years for m in range(14) for d in range(33)]


def _fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


@pytest.mark.parametrize(
    "fmt", ["time", "email", "uri", "uuid", "ipv4", "duration", "", "Date", "DATE-TIME", "date "]
)
def test_other_formats_have_no_pattern(fmt: str) -> None:
    assert exact_format_pattern(fmt) is None


@pytest.mark.parametrize("pattern", [DATE, DATE_TIME])
def test_patterns_are_anchored(pattern: str) -> None:
    assert pattern.startswith("^") and pattern.endswith("$")


def test_oracle_reads_year_zero_as_a_leap_year() -> None:
    assert calendar.isleap(0)
    assert _valid_date("0000-02-29") and not _valid_date("0000-02-30")


def test_date_grid_matches_the_calendar() -> None:
    grid = _grid(YEARS)
    wrong = [d for d in grid if _fullmatch(DATE, d) != _valid_date(d)]
    assert wrong == []
    # The grid holds both kinds: 366 or 365 valid days a year, the rest invalid.
    days = sum(366 if calendar.isleap(int(y)) else 365 for y in YEARS)
    assert sum(_fullmatch(DATE, d) for d in grid) == days


def test_february_end_in_every_year() -> None:
    for year in range(10000):
        y = f"{year:04d}"
        assert _fullmatch(DATE, f"{y}-02-28") and not _fullmatch(DATE, f"{y}-02-30")
        assert _fullmatch(DATE, f"{y}-02-29") == calendar.isleap(year), y


@pytest.mark.parametrize(
    "text",
    [
        "24-02-29", "2024-2-29", "2024-02-9", "12024-02-28", "+2024-02-28", "2024/02/28",
        "20240228", "2024-02-28 ", " 2024-02-28", "2024-02-28T00:00:00Z", "\uff12024-02-28",
        "2024-\u0660\u0662-28",
    ],
)
def test_date_rejects_other_shapes(text: str) -> None:
    assert not _fullmatch(DATE, text)


def test_date_time_date_part_matches_the_calendar() -> None:
    grid = _grid(["1900", "2000", "2023", "2024"])
    wrong = [d for d in grid if _fullmatch(DATE_TIME, d + "T12:00:00Z") != _valid_date(d)]
    assert wrong == []


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("2024-02-29T23:59:59Z", True),
        ("2023-12-31T00:00:00+05:30", True),
        ("2023-12-31T00:00:00-23:59", True),
        ("2024-01-01T08:15:30.123456Z", True),
        ("2016-12-31T23:59:60Z", True),  # a leap second, as xgrammar accepts
        ("2024-02-29T00:00:00.5-00:00", True),
        ("2023-02-29T00:00:00Z", False),
        ("2022-04-31T00:00:00Z", False),
        ("2100-02-29T00:00:00Z", False),
        ("2024-02-29T24:00:00Z", False),
        ("2024-02-29T00:00:61Z", False),
        ("2024-02-29T00:00:00", False),
        ("2024-02-29 00:00:00Z", False),
        ("2024-02-29t00:00:00z", False),  # xgrammar's rule is upper-case only
        ("2024-02-29T00:00:00.Z", False),
        ("2024-02-29T00:00:00+24:00", False),
    ],
)
def test_date_time_cases(text: str, valid: bool) -> None:
    assert _fullmatch(DATE_TIME, text) == valid


# ---- xgrammar -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xgr_env() -> dict[str, Any]:
    """The demo model's tokenizer, its xgrammar TokenizerInfo and a compiler."""
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    from specserve.demo import demo_model_dir

    d = demo_model_dir(build=False)
    tokenizer = AutoTokenizer.from_pretrained(str(d))
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=AutoConfig.from_pretrained(str(d)).vocab_size
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    return {"tokenizer": tokenizer, "info": info, "compiler": compiler}


def _compile(env: dict[str, Any], schema: dict[str, Any]) -> Any:
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    return env["compiler"].compile_grammar(grammar)


def _accepts(compiled: Any, json_text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    return bool(matcher.accept_string(json_text)) and bool(matcher.is_completed())


def _allowed(bitmask: Any, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def _walk(env: dict[str, Any], compiled: Any, json_text: str) -> bool:
    """Feed ``json_text`` token by token, each checked against the mask; True if it completes."""
    import xgrammar as xgr

    info = env["info"]
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for token in env["tokenizer"].encode(json_text, add_special_tokens=False):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = _allowed(bitmask, token)
        assert matcher.accept_token(token) == allowed
        if not allowed:
            return False
    matcher.fill_next_token_bitmask(bitmask)
    return matcher.is_completed() and any(_allowed(bitmask, t) for t in info.stop_token_ids)


@pytest.mark.parametrize("fmt", ["date", "date-time"])
def test_pattern_compiles_in_xgrammar(xgr_env: dict[str, Any], fmt: str) -> None:
    pattern = exact_format_pattern(fmt)
    compiled = _compile(xgr_env, {"type": "string", "pattern": pattern})
    suffix = "T00:00:00Z" if fmt == "date-time" else ""
    assert _accepts(compiled, f'"2024-02-29{suffix}"')
    assert not _accepts(compiled, f'"2023-02-29{suffix}"')


@pytest.mark.parametrize(
    ("text", "valid"), [("2024-02-29", True), ("2023-02-29", False), ("2022-04-31", False)]
)
def test_token_walk_through_the_matcher(xgr_env: dict[str, Any], text: str, valid: bool) -> None:
    compiled = _compile(xgr_env, {"type": "string", "pattern": DATE})
    assert _walk(xgr_env, compiled, f'"{text}"') == valid
    # xgrammar's own rule takes every one of them.
    assert _walk(xgr_env, _compile(xgr_env, {"type": "string", "format": "date"}), f'"{text}"')


def test_xgrammar_reads_the_date_pattern_like_python(xgr_env: dict[str, Any]) -> None:
    compiled = _compile(xgr_env, {"type": "string", "pattern": DATE})
    grid = _grid(["2000", "2023", "2024", "2100"])
    wrong = [d for d in grid if _accepts(compiled, f'"{d}"') != _fullmatch(DATE, d)]
    assert wrong == []


def test_time_part_is_xgrammars_own(xgr_env: dict[str, Any]) -> None:
    ours = _compile(xgr_env, {"type": "string", "pattern": DATE_TIME})
    own = _compile(xgr_env, {"type": "string", "format": "date-time"})
    wrong = []
    accepted = 0
    for h, m, s, f, o in itertools.product(HOURS, MINUTES, SECONDS, FRACTIONS, OFFSETS):
        text = f"2024-02-29T{h}:{m}:{s}{f}{o}"
        theirs = _accepts(own, f'"{text}"')
        accepted += theirs
        if _accepts(ours, f'"{text}"') != theirs or _fullmatch(DATE_TIME, text) != theirs:
            wrong.append(text)
    assert wrong == []
    # 6 hours x 2 minutes x 3 seconds x 3 fractions x 3 offsets are valid.
    assert accepted == 6 * 2 * 3 * 3 * 3
