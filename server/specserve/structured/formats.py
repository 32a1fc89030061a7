"""Calendar-exact regexes for JSON Schema's ``date`` and ``date-time`` string formats.

JSON Schema's ``date`` is RFC 3339's ``full-date``: a month has 30 or 31 days, February 28, and
29 only in a leap year. xgrammar 0.2.8 converts ``{"format": "date"}`` (and the date part of
``date-time``) to ``YYYY-(01..12)-(01..31)`` for every month, so a constrained output can be
``2023-02-29`` or ``2024-04-31``. :func:`exact_format_pattern` gives a ``pattern`` that a schema
rewrite can put in place of such a format; xgrammar converts ``pattern`` with its regex converter.

The date regex splits on what the day depends on:

* any year: days 01-28 of every month, 29-30 of every month but February, 31 of the 31-day months;
* a leap year: ``02-29``.

A year (4 digits, proleptic Gregorian, so 0000 is a leap year like 2000) is a leap year when its
last two digits ``YY`` are a multiple of 4 other than ``00``, or ``YY`` is ``00`` and its first
two digits are a multiple of 4. A two-digit multiple of 4 has an even tens digit and a units digit
in ``048``, or an odd tens digit and a units digit in ``26``:

* ``2024``: ``24`` is a multiple of 4, a leap year;
* ``2100``: ``00``, and ``21`` is not a multiple of 4, a common year;
* ``2000``: ``00``, and ``20`` is a multiple of 4, a leap year.

The time part of ``date-time`` is copied from xgrammar 0.2.8's own rule so that it accepts the
same times: an upper-case ``T``, hour 00-23, minute 00-59, second 00-60 (a leap second), an
optional fraction of one or more digits, then ``Z`` or a ``+``/``-`` offset ``HH:MM`` (hour 00-23,
minute 00-59).

Digits are written ``[0-9]``, not ``\\d``: Python's ``\\d`` also matches other Unicode digits, and
the class keeps Python's ``re`` and xgrammar in agreement.

Example:
    >>> import re
    >>> date = exact_format_pattern("date")
    >>> [bool(re.fullmatch(date, d)) for d in ("2024-02-29", "2023-02-29", "2022-04-31")]
    [True, False, False]
    >>> [bool(re.fullmatch(date, d)) for d in ("2000-02-29", "2100-02-29", "0000-02-29")]
    [True, False, True]
    >>> bool(re.fullmatch(exact_format_pattern("date-time"), "2024-02-29T23:59:60.5+05:30"))
    True
    >>> exact_format_pattern("email") is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Two-digit multiples of 4: with 00 (a century's first two digits) and without (a year's last two).
_MULTIPLE_OF_4 = "[02468][048]|[13579][26]"
_NONZERO_MULTIPLE_OF_4 = "0[48]|[2468][048]|[13579][26]"

LEAP_YEAR = f"(?:[0-9]{{2}}(?:{_NONZERO_MULTIPLE_OF_4})|(?:{_MULTIPLE_OF_4})00)"
"""A 4-digit leap year: ``2024``, ``2000``, ``0000``; not ``2100`` or ``2023``."""

MONTH_DAY = (
    "(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"  # days 01-28, every month
    "|(?:0[13-9]|1[0-2])-(?:29|30)"  # days 29-30, every month but February
    "|(?:0[13578]|1[02])-31)"  # day 31, the 31-day months
)
"""``MM-DD`` valid in every year (so not ``02-29``)."""

FULL_DATE = f"(?:[0-9]{{4}}-{MONTH_DAY}|{LEAP_YEAR}-02-29)"
"""RFC 3339 ``full-date``, calendar-exact."""

_HOUR = "(?:[01][0-9]|2[0-3])"
TIME = (
    f"T{_HOUR}:[0-5][0-9]:(?:[0-5][0-9]|60)"  # hour, minute, second (60: leap second)
    "(?:\\.[0-9]+)?"  # fraction
    f"(?:Z|[+-]{_HOUR}:[0-5][0-9])"  # offset
)
"""``T`` and the time with its offset, accepting what xgrammar 0.2.8's ``date-time`` accepts."""

PATTERNS: Mapping[str, str] = MappingProxyType(
    {
        "date": f"^{FULL_DATE}$",
        "date-time": f"^{FULL_DATE}{TIME}$",
    }
)
"""The anchored pattern for each format this module makes exact."""


def exact_format_pattern(fmt: str) -> str | None:
    """Return an anchored regex accepting exactly the valid strings of format ``fmt``, or None.

    Only ``date`` and ``date-time`` have one (see the module doc); every other format, known to
    xgrammar or not, gives None. The regex is a JSON Schema ``pattern`` that xgrammar 0.2.8's
    regex converter accepts, and Python's ``re.fullmatch`` reads it the same way.

    >>> exact_format_pattern("date")[:1], exact_format_pattern("date")[-1:]
    ('^', '$')
    >>> exact_format_pattern("time") is None
    True
    """
    return PATTERNS.get(fmt)
