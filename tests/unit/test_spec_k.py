"""Per-request speculation length: parsing ``spec_k`` and capping draft lists (pure parts)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specserve_vllm.spec_k import InvalidSpecK, cap_drafts, parse_spec_k, safe_spec_k


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(None, None), ({}, None), ({"other": 1}, None), ({"spec_k": None}, None), ({"spec_k": 0}, 0), ({"spec_k": 7}, 7)],
)
def test_parse_valid(extra: dict | None, expected: int | None) -> None:
    assert parse_spec_k(extra) == expected


@pytest.mark.parametrize("bad", [-1, 2.0, "3", True, [1]])
def test_parse_invalid_is_a_clear_error(bad: object) -> None:
    with pytest.raises(InvalidSpecK, match="spec_k"):
        parse_spec_k({"spec_k": bad})
    assert safe_spec_k({"spec_k": bad}) is None


@given(
    st.lists(st.tuples(st.lists(st.integers(0, 50), max_size=6), st.one_of(st.none(), st.integers(0, 8))), max_size=8)
)
def test_cap_drafts_is_a_prefix_of_at_most_the_cap(rows: list[tuple[list[int], int | None]]) -> None:
    drafts = [d for d, _ in rows]
    caps = [c for _, c in rows]
    out = cap_drafts(drafts, caps)
    assert len(out) == len(drafts)
    for d, c, o in zip(drafts, caps, out):
        assert o == (d if c is None else d[:c])


def test_cap_drafts_length_mismatch() -> None:
    with pytest.raises(ValueError):
        cap_drafts([[1]], [])
