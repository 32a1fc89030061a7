"""Prompts and greedy runs shared by the real-engine drafter tests."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PROMPTS = [
    "def add(a, b):\n    return",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\n",
    "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n",
    "# a comment\n",
    "def main():\n",
    "return None\nreturn None\nreturn None\n",
]
REPETITIVE = 4  # index of a prompt whose continuation repeats


def greedy(max_tokens: int, extra_args: dict[str, Any] | None = None) -> Any:
    """Temperature-0 sampling params of exactly ``max_tokens`` tokens."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args)


def run_batches(llm: Any, max_tokens: int) -> dict[str, Any]:
    """Batch-1 outputs for three prompts, batch-8 outputs for all, and the batch-8 request outputs."""
    params = greedy(max_tokens)
    batch1 = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in PROMPTS[:3]]
    results = llm.generate(PROMPTS, params, use_tqdm=False)
    return {
        "batch1": batch1,
        "batch8": [list(r.outputs[0].token_ids) for r in results],
        "outputs": [r.outputs[0] for r in results],
    }


def assert_greedy_equal(spec: dict[str, Any], base: dict[str, Any], max_tokens: int) -> None:
    """A speculative run's greedy batches (:func:`run_batches`) equal the no-speculation run's,
    token for token; the baseline must not stop early, or the comparison would be short."""
    assert all(len(t) == max_tokens for t in base["batch8"]), "the baseline stopped before max_tokens"
    assert spec["batch1"] == base["batch1"]
    assert spec["batch8"] == base["batch8"]


@contextmanager
def heads_env(directory: str | None) -> Iterator[None]:
    """The engine setting ``heads_dir`` set to ``directory`` (left alone when None) in the block."""
    from specserve.engine import settings

    if directory is None:
        yield
        return
    with settings.override(heads_dir=directory):
        yield


def homogeneity_z(a: list[int], b: list[int], min_count: int = 10) -> float:
    """Chi-square two-sample homogeneity test as a z-score (Wilson-Hilferty).

    Categories seen fewer than ``min_count`` times in both samples together are pooled.
    Under the null (same distribution) z is about standard normal; identical samples give
    a strongly negative z, very different ones a large positive z.
    """
    ca, cb = Counter(a), Counter(b)
    buckets: list[tuple[int, int]] = []
    rare = [0, 0]
    for cat in set(ca) | set(cb):
        if ca[cat] + cb[cat] >= min_count:
            buckets.append((ca[cat], cb[cat]))
        else:
            rare[0] += ca[cat]
            rare[1] += cb[cat]
    if sum(rare):
        buckets.append((rare[0], rare[1]))
    df = len(buckets) - 1
    if df < 1:
        return -math.inf
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in buckets:
        ea, eb = (x + y) * na / (na + nb), (x + y) * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    v = 2.0 / (9.0 * df)
    return ((stat / df) ** (1.0 / 3.0) - (1.0 - v)) / math.sqrt(v)


def assert_same_law(base: list[Any], spec: list[Any], positions: int, z_max: float = 3.7) -> None:
    """Each of the first ``positions`` sampled tokens has the same distribution in ``spec``'s
    outputs as in ``base``'s (chi-square homogeneity per position; ``z_max`` 3.7 is p < 1e-4),
    and at least one position had categories common enough to test."""
    zs: list[float] = []
    for pos in range(positions):
        z = homogeneity_z([o.token_ids[pos] for o in base], [o.token_ids[pos] for o in spec])
        assert z < z_max, f"token {pos}: z={z:.2f} (p < 1e-4 under equal distributions)"
        zs.append(z)
    assert max(zs) > -math.inf, "every sampled token was rare: the comparison tested nothing"


def walked_chain_steps(runner: Any) -> int:
    """Chain steps a model runner verified by the walk so far (0 before its first)."""
    from specserve_vllm.compat.tree_steps import COUNTERS_ATTR

    found = getattr(runner, COUNTERS_ATTR, None)
    return 0 if found is None else found.walked_chains


CHEAP_ROWS_CALIBRATION = {
    "cost": {"base": 2.6984, "per_token": 0.02823, "per_row": 0.05911, "context": 0.0, "spec": 0.7193,
             "spec_row": 0.06224, "draft": 0.58523, "draft_token": 0.0267},
    "drafter_cost": {"RecyclingProposer": [0.22274, 0.00632], "HydraProposer": [0.92702, 0.06141],
                     "MedusaProposer": [0.57671, 0.02239]},
    "acceptance": {"RecyclingProposer": [0.4658, 0.5739, 0.5593, 0.6364],
                   "HydraProposer": [0.5679, 0.7008, 0.6923, 0.7222],
                   "MedusaProposer": [0.3849, 0.4381, 0.4773, 0.8095]},
    "source": "test: cheap verified rows",
}
"""A quiet machine's fit of 2026-12-05, under which a verified row costs about 1% of a plain step,
so a goodput controller speculates at batch 8 too."""


def cheap_rows_calibration(directory: Any) -> str:
    """:data:`CHEAP_ROWS_CALIBRATION` written to ``directory``: for tests of what an engine does
    while its goodput controller speculates. Written out in full, so that a new shipped
    calibration leaves it alone."""
    import json
    from pathlib import Path

    path = Path(directory) / "cheap-rows-calibration.json"
    path.write_text(json.dumps(CHEAP_ROWS_CALIBRATION))
    return str(path)
