"""The drafter benchmarks' acceptance arithmetic and prompts: distinct windows of the held-out
files, and no prompt served twice by one engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specserve.bench.drafters import held_out_prompts, tau, window_starts
from specserve.bench.trees import prompt_cells


def test_tau_worked_examples() -> None:
    assert tau(10, 12) == 2.2
    assert tau(0, 0) == 1.0
    assert tau(5, 0) == 1.0


@given(st.integers(1, 10_000), st.integers(0, 8))
def test_tau_is_between_one_and_k_plus_one(steps: int, k: int) -> None:
    accepted = steps * k  # every draft of every step accepted
    assert tau(steps, accepted) == float(k + 1)
    assert 1.0 <= tau(steps, accepted // 2) <= k + 1


@given(st.integers(0, 5_000), st.integers(1, 400), st.integers(1, 20))
def test_windows_fit_the_file_and_leave_a_gap_after_each(length: int, n_tokens: int, windows: int) -> None:
    starts = window_starts(length, n_tokens, windows)
    assert len(starts) <= windows
    assert all(s + n_tokens <= length for s in starts)
    # the text after a window (as long as the window) belongs to no window
    assert all(b - a >= 2 * n_tokens for a, b in zip(starts, starts[1:]))
    assert starts == sorted(starts) and (not starts or starts[0] == 0)


def test_held_out_prompts_are_distinct_and_start_with_every_files_first_window(demo_model_dir: Path) -> None:
    first = held_out_prompts(demo_model_dir, 500, 96)
    more = held_out_prompts(demo_model_dir, 500, 96, windows_per_file=16)
    # how many files there are depends on the Python install's stdlib (a distribution's may lack some)
    assert 1 <= len(first) < len(more) <= 500  # later windows add prompts beyond one per file
    assert more[: len(first)] == first  # every file's first window comes first, as before
    assert all(len(p) == 96 for p in more)
    assert len({tuple(p) for p in more}) == len(more)  # no prompt twice, even where files open alike
    assert held_out_prompts(demo_model_dir, 3, 96, windows_per_file=16) == more[:3]


def test_prompt_cells_never_share_a_prompt() -> None:
    pool = [[i] for i in range(40)]
    cells = prompt_cells(pool, 3, 2, [0.0, 0.7], [1, 8])
    assert len(cells) == 8 and all(len(c) == 3 for c in cells.values())
    served = [p[0] for c in cells.values() for p in c]
    assert len(set(served)) == len(served) == 24
    with pytest.raises(ValueError, match="need 48 distinct prompts"):
        prompt_cells(pool, 6, 2, [0.0, 0.7], [1, 8])
