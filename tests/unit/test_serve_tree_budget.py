"""``specserve serve --tree-budget N`` starts the engine with ``num_speculative_tokens = N`` for
trees, and refuses the flag with chains or without a drafter (stand-in engines)."""

from __future__ import annotations

import json

import pytest

from specserve.engine.process import free_port  # bound before the stand-in replaces it
from support.serve_standin import StandInEngine, run_serve


@pytest.fixture(autouse=True)
def no_tree_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECSERVE_TREE", raising=False)


def _drafts(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, int | None]:
    code, _ = run_serve(monkeypatch, ["--drafter", "recycling", *argv], [free_port() for _ in range(3)])
    if not StandInEngine.made:
        return code, None
    config = json.loads(StandInEngine.made[0].spec.speculative_config or "{}")
    return code, config.get("num_speculative_tokens")


def test_a_tree_budget_sets_the_engines_draft_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _drafts(["--tree", "dynamic", "--tree-budget", "16"], monkeypatch) == (0, 16)
    assert _drafts(["--tree", "static", "--num-speculative-tokens", "3"], monkeypatch) == (0, 3)
    assert _drafts(["--num-speculative-tokens", "5"], monkeypatch) == (0, 5)


def test_the_tree_setting_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSERVE_TREE", "static")
    assert _drafts(["--tree-budget", "8"], monkeypatch) == (0, 8)


@pytest.mark.parametrize("argv", [["--tree-budget", "8"], ["--tree", "chain", "--tree-budget", "8"],
                                  ["--tree", "dynamic", "--tree-budget", "0"]])
def test_a_budget_without_trees_is_refused(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert _drafts(argv, monkeypatch) == (2, None)


def test_a_budget_without_a_drafter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _ = run_serve(monkeypatch, ["--tree", "dynamic", "--tree-budget", "8"], [free_port() for _ in range(3)])
    assert code == 2 and not StandInEngine.made
