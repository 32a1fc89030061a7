"""The drafter benchmark's acceptance arithmetic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from specserve.bench.drafters import tau


def test_tau_worked_examples() -> None:
    assert tau(10, 12) == 2.2
    assert tau(0, 0) == 1.0
    assert tau(5, 0) == 1.0


@given(st.integers(1, 10_000), st.integers(0, 8))
def test_tau_is_between_one_and_k_plus_one(steps: int, k: int) -> None:
    accepted = steps * k  # every draft of every step accepted
    assert tau(steps, accepted) == float(k + 1)
    assert 1.0 <= tau(steps, accepted // 2) <= k + 1
