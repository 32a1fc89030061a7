"""``specserve bench tree-projection``: the per-row pricing agrees with itself and reads a real
``bench trees`` report."""

from __future__ import annotations

import argparse
import doctest
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specserve.bench import tree_projection as tp

DOCS = Path(__file__).resolve().parents[2] / "docs" / "figures"

def test_docstring_examples() -> None:
    result = doctest.testmod(tp)
    assert result.attempted > 0 and result.failed == 0


arms = st.builds(lambda budget, tau: (budget, tau), st.integers(1, 32), st.floats(1.0, 6.0))


@given(tree=arms, chains=st.lists(arms, min_size=1, max_size=4), eps=st.floats(0.0, 0.5))
def test_the_winning_interval_is_where_the_tree_is_at_least_as_fast(
        tree: tuple[int, float], chains: list[tuple[int, float]], eps: float) -> None:
    t = tp.Arm("dynamic", tree[0], tree[0] + 1, tree[1], 0.0)
    cs = [tp.Arm("chain", b, b + 1, tau, 0.0) for b, tau in chains]
    faster = all(tp.projected_speedup(t.tau, t.rows, eps) >= tp.projected_speedup(c.tau, c.rows, eps) for c in cs)
    interval = tp.winning_eps(t, cs)
    inside = interval is not None and interval[0] <= eps <= interval[1]
    near_edge = interval is not None and min(abs(eps - interval[0]), abs(eps - interval[1])) < 1e-9
    assert inside == faster or near_edge


def test_free_rows_price_arms_by_tau_and_costly_rows_favour_short_arms() -> None:
    chain8, tree16 = tp.Arm("chain", 8, 9, 1.6, 0.0), tp.Arm("dynamic", 16, 17, 1.9, 0.0)
    free = tp.projected_speedup(tree16.tau, tree16.rows, 0.0) / tp.projected_speedup(chain8.tau, chain8.rows, 0.0)
    assert free == pytest.approx(1.9 / 1.6)
    low, high = tp.winning_eps(tree16, [chain8])
    assert low == 0.0 and high == pytest.approx(0.3 / (1.6 * 16 - 1.9 * 8))
    assert tp.projected_speedup(1.9, 17, high * 1.01) < tp.projected_speedup(1.6, 9, high * 1.01)


def _report() -> dict:
    def row(shape: str, budget: int, tau: float, tps: float, policy: str = "fixed") -> dict:
        return {"shape": shape, "budget": budget, "policy": policy, "tau": tau, "tokens_per_s": tps,
                "batch": 1, "temperature": 0.0}
    return {"drafter": "recycling", "none_tokens_per_s": {"1@0": [300.0, 350.0, 330.0]},
            "rows": [row("chain", 8, 2.9, 600.0), row("chain", 16, 3.0, 500.0), row("dynamic", 8, 3.2, 490.0),
                     row("dynamic", 16, 3.9, 480.0), row("dynamic", 16, 9.0, 9000.0, policy="goodput")]}


def test_a_report_is_projected_from_its_fixed_arms() -> None:
    result = tp.project(_report(), (0.0, 0.05), chain_cap=None)
    (point,) = result["points"]
    assert point["tau_ratio"] == pytest.approx(3.9 / 3.0, abs=1e-3)  # the goodput arm is left out
    assert point["best_tree_by_tau"] == "dynamic 16" and point["best_chain_by_tau"] == "chain 16"
    assert [p["ratio"] for p in point["projected"]][0] == pytest.approx(3.9 / 3.0, abs=1e-3)
    assert point["projected"][1]["ratio"] < point["projected"][0]["ratio"]
    assert point["measured_ratio"] == pytest.approx(490.0 / 600.0, abs=1e-3)
    assert point["trees_win_up_to_eps"] == "any"  # dynamic 8 has the chain 8's rows and more τ
    cpu = point["cpu"]
    assert cpu["plain_step_ms"] == pytest.approx(1000.0 / 330.0, abs=1e-3)
    assert cpu["step_ms"]["chain 8"] == pytest.approx(1000.0 * 2.9 / 600.0, abs=1e-3)
    slope = (1000.0 * 3.0 / 500.0 - 1000.0 * 2.9 / 600.0) / 8
    assert cpu["eps"] == pytest.approx(slope / (1000.0 / 330.0), abs=1e-3)
    assert cpu["tree_own_ms"]["dynamic 8"] == pytest.approx(1000.0 * 3.2 / 490.0 - 1000.0 * 2.9 / 600.0, abs=1e-3)


@pytest.mark.parametrize("name, cap", [("trees-successor-rows-controller-recycling-2026-12-05.json", None),
                                       ("trees-side-rows-hydra-2026-12-05.json", 4)])
def test_the_command_reads_a_bench_trees_report(name: str, cap: int | None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    tp.add_arguments(parser)
    argv = ["--input", str(DOCS / name), "--eps", "0,0.02", "--row-ms", "0.1"]
    assert tp.run(parser.parse_args(argv + (["--chain-cap", str(cap)] if cap else []))) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert {(p["batch"], p["temperature"]) for p in result["points"]} == {(1, 0.0), (1, 0.7), (8, 0.0), (8, 0.7)}
    for point in result["points"]:
        assert point["projected"][0]["ratio"] == pytest.approx(point["tau_ratio"], abs=1e-3)
        assert point["tau_ratio"] > 1.0  # these runs' trees verify more per step than their chains
        assert ("cpu" in point) == (point["batch"] == 1)
        if "cpu" in point:
            assert all(ms > 0 for ms in point["cpu"]["tree_own_ms"].values())
            assert not math.isnan(point["cpu"]["eps"])
    assert out.err.startswith(f"{result['drafter']} trees / best chain: bs1 t0:")
