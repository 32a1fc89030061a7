"""``specserve bench tree-projection``: what a ``bench trees`` run's τ buys where the forward pass dominates.

Reads the JSON of ``specserve bench trees`` (``--input``) and runs nothing. A chain of ``k``
drafts and a tree of ``k`` nodes both verify ``1 + k`` rows per request and step; what a row
costs decides whether a tree's higher τ pays. With the cost of a step that verifies ``r`` rows
written as ``1 + eps * (r - 1)`` plain steps, an arm commits ``tau / (1 + eps * (r - 1))``
tokens per plain step's time. ``eps`` near 0 is a forward pass that reads its weights once for
all rows (a large model at small batch on an accelerator); on this CPU's demo model every row
costs real compute (``eps`` of a few percent) and each tree request adds work of its own (side
rows, compaction), which this module measures from the same run at batch 1.

Per (batch, temperature) point, over the ``fixed`` arms (goodput arms mix in steps without
speculation): the best tree's τ over the best chain's, the projected tokens/s ratio of the best
tree to the best chain at each ``--eps``, the largest ``eps`` up to which some tree is at least as
fast as every chain (``any``: at every ``eps``),
and at batch 1 the measured step costs: each arm's step time, the per-row cost fitted over the
chain arms, and each tree's cost beyond that line (the tree's own work).
JSON on stdout, one summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_EPS = (0.0, 0.005, 0.01, 0.02, 0.05)


@dataclass(frozen=True)
class Arm:
    """One fixed arm of ``bench trees`` at one point: its shape, node budget, verified rows per
    request and step (``1 + drafts``), τ, and tokens/s (median over repetitions)."""

    shape: str
    budget: int
    rows: int
    tau: float
    tokens_per_s: float

    @property
    def is_tree(self) -> bool:
        return self.shape != "chain"


def verified_rows(shape: str, budget: int, chain_cap: int | None) -> int:
    """Rows a request verifies per step: the root and its drafts (a chain is capped by the
    drafter's depth, e.g. Hydra's heads; a tree holds ``budget`` nodes at any depth).

    >>> verified_rows("chain", 16, 4), verified_rows("dynamic", 16, 4), verified_rows("chain", 8, None)
    (5, 17, 9)
    """
    drafts = budget if shape != "chain" or chain_cap is None else min(budget, chain_cap)
    return 1 + drafts


def projected_speedup(tau: float, rows: int, eps: float) -> float:
    """Tokens per plain step's time when a step of ``rows`` rows costs ``1 + eps * (rows - 1)``.

    >>> projected_speedup(3.0, 9, 0.0), projected_speedup(3.0, 9, 0.25)
    (3.0, 1.0)
    """
    return tau / (1.0 + eps * (rows - 1))


def winning_eps(tree: Arm, chains: list[Arm]) -> tuple[float, float] | None:
    """The per-row costs ``(low, high)`` at which ``tree`` is at least as fast as every one of
    ``chains`` (``high`` may be ``inf``), or ``None`` when it is at none.

    Against one chain the tree is no slower while
    ``tau_t - tau_c >= eps * (tau_c * n_t - tau_t * n_c)`` (``n``: drafts, ``rows - 1``): up to a
    bound when it has more rows, from a bound on when it has fewer and less τ.

    >>> chain = Arm("chain", 8, 9, 1.6, 0.0)
    >>> low, high = winning_eps(Arm("dynamic", 16, 17, 1.9, 0.0), [chain])   # 0.3 / (1.6*16 - 1.9*8)
    >>> low, round(high, 4)
    (0.0, 0.0288)
    >>> winning_eps(Arm("dynamic", 8, 9, 1.8, 0.0), [chain])                 # same rows, more τ
    (0.0, inf)
    >>> winning_eps(Arm("dynamic", 8, 9, 1.5, 0.0), [chain]) is None
    True
    >>> low, high = winning_eps(Arm("dynamic", 4, 5, 1.5, 0.0), [chain])     # fewer rows, less τ
    >>> round(low, 4), high
    (0.0179, inf)
    """
    low, high = 0.0, math.inf
    n_t = tree.rows - 1
    for chain in chains:
        gain, n_c = tree.tau - chain.tau, chain.rows - 1
        slope = chain.tau * n_t - tree.tau * n_c
        if slope > 0:
            high = min(high, gain / slope)
        elif slope < 0:
            low = max(low, gain / slope)
        elif gain < 0:
            return None
    return (low, high) if low <= high else None


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(intercept, slope)`` of ``y`` on ``x``; ``None`` with fewer than two
    distinct ``x``.

    >>> line_fit([(9, 4.8), (17, 6.4)])
    (3.0, 0.2)
    >>> line_fit([(5, 6.0), (5, 6.2)]) is None
    True
    """
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return round(my - slope * mx, 6), round(slope, 6)


def point_arms(rows: list[dict[str, Any]], batch: int, temperature: float, chain_cap: int | None) -> list[Arm]:
    """The fixed arms of one point of a ``bench trees`` report."""
    return [Arm(r["shape"], int(r["budget"]), verified_rows(r["shape"], int(r["budget"]), chain_cap),
                float(r["tau"]), float(r["tokens_per_s"]))
            for r in rows if r["policy"] == "fixed" and r["batch"] == batch and r["temperature"] == temperature]


def project_point(arms: list[Arm], eps_grid: tuple[float, ...], plain_step_ms: float | None,
                  row_ms: float | None = None) -> dict[str, Any]:
    """The projection and, when ``plain_step_ms`` is given (batch 1), the measured costs."""
    chains = [a for a in arms if not a.is_tree]
    trees = [a for a in arms if a.is_tree]
    if not chains or not trees:
        return {}
    best_chain_tau = max(chains, key=lambda a: a.tau)
    best_tree_tau = max(trees, key=lambda a: a.tau)
    projected = []
    for eps in eps_grid:
        chain = max(chains, key=lambda a: projected_speedup(a.tau, a.rows, eps))
        tree = max(trees, key=lambda a: projected_speedup(a.tau, a.rows, eps))
        ratio = projected_speedup(tree.tau, tree.rows, eps) / projected_speedup(chain.tau, chain.rows, eps)
        projected.append({"eps": eps, "best_chain": f"{chain.shape} {chain.budget}",
                          "best_tree": f"{tree.shape} {tree.budget}", "ratio": round(ratio, 3)})
    upper = [w[1] for w in (winning_eps(t, chains) for t in trees) if w is not None and w[0] == 0.0]
    measured_chain = max(chains, key=lambda a: a.tokens_per_s)
    measured_tree = max(trees, key=lambda a: a.tokens_per_s)
    out: dict[str, Any] = {
        "tau_ratio": round(best_tree_tau.tau / best_chain_tau.tau, 3),
        "best_chain_by_tau": f"{best_chain_tau.shape} {best_chain_tau.budget}",
        "best_tree_by_tau": f"{best_tree_tau.shape} {best_tree_tau.budget}",
        "projected": projected,
        "trees_win_up_to_eps": _bound(max(upper, default=0.0)),
        "measured_ratio": round(measured_tree.tokens_per_s / measured_chain.tokens_per_s, 3),
    }
    if plain_step_ms:
        out["cpu"] = measured_costs(chains, trees, plain_step_ms, row_ms)
    return out


def _bound(eps: float) -> float | str:
    """An ``eps`` bound as JSON holds it (``"any"`` for no bound)."""
    return "any" if math.isinf(eps) else round(eps, 4)


def measured_costs(chains: list[Arm], trees: list[Arm], plain_step_ms: float,
                   row_ms: float | None = None) -> dict[str, Any]:
    """Batch 1: each arm's step time (τ tokens per step), the chain arms' cost per row as a
    share of a plain step (``eps``), each tree's cost beyond the chains' line at its rows, and
    the best tree's tokens/s over the best chain's if trees cost only their rows. ``row_ms``
    prices a row where the chain arms all verify as many rows (Medusa/Hydra: their heads); the
    line then goes through the chains' mean at that slope.

    >>> chains = [Arm("chain", 4, 5, 2.0, 400.0)]                 # 5 ms a step
    >>> cpu = measured_costs(chains, [Arm("dynamic", 8, 9, 2.4, 300.0)], 3.0, row_ms=0.25)
    >>> cpu["eps"], cpu["tree_own_ms"], cpu["ratio_without_tree_work"]   # line at 9 rows: 6 ms
    (0.0833, {'dynamic 8': 2.0}, 1.0)
    """
    step = {a: 1000.0 * a.tau / a.tokens_per_s for a in chains + trees}
    fit = line_fit([(a.rows, step[a]) for a in chains])
    if fit is None and row_ms is not None:
        fit = (statistics.fmean(step[a] - row_ms * a.rows for a in chains), row_ms)
    out: dict[str, Any] = {
        "plain_step_ms": round(plain_step_ms, 3),
        "step_ms": {f"{a.shape} {a.budget}": round(step[a], 3) for a in chains + trees},
        "eps": None if fit is None else round(fit[1] / plain_step_ms, 4),
        "eps_from": "chains" if row_ms is None or len({a.rows for a in chains}) > 1 else "row_ms",
    }
    if fit is None:
        return out
    intercept, slope = fit
    line = {a: intercept + slope * a.rows for a in trees}
    out["tree_own_ms"] = {f"{a.shape} {a.budget}": round(step[a] - line[a], 3) for a in trees}
    best_chain = max(a.tokens_per_s for a in chains)
    best_tree = max(1000.0 * a.tau / line[a] for a in trees)
    out["ratio_without_tree_work"] = round(best_tree / best_chain, 3)
    return out


def project(report: dict[str, Any], eps_grid: tuple[float, ...], chain_cap: int | None,
            row_ms: float | None = None) -> dict[str, Any]:
    """The projection of every point of a ``bench trees`` report."""
    rows = report["rows"]
    points = sorted({(int(r["batch"]), float(r["temperature"])) for r in rows})
    out = []
    for batch, temperature in points:
        plain = report.get("none_tokens_per_s", {}).get(f"{batch}@{temperature:g}")
        plain_ms = 1000.0 / statistics.median(plain) if batch == 1 and plain else None
        result = project_point(point_arms(rows, batch, temperature, chain_cap), eps_grid, plain_ms, row_ms)
        if result:
            out.append({"batch": batch, "temperature": temperature, **result})
    return {"drafter": report.get("drafter"), "chain_cap": chain_cap, "row_ms": row_ms, "eps": list(eps_grid),
            "points": out}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help="JSON written by `specserve bench trees`")
    parser.add_argument("--eps", default=",".join(f"{e:g}" for e in DEFAULT_EPS),
                        help="cost of each verified row beyond the first, as a share of a plain step")
    parser.add_argument("--chain-cap", type=int, default=None,
                        help="longest chain the drafter drafts (Medusa/Hydra: its heads); default: the budget")
    parser.add_argument("--row-ms", type=float, default=None,
                        help="cost of a verified row (ms) where the chain arms cannot give it (one row count)")


def run(args: argparse.Namespace) -> int:
    report = json.loads(args.input.read_text())
    eps_grid = tuple(float(e) for e in str(args.eps).split(",") if e.strip())
    result = {"input": str(args.input), **project(report, eps_grid, args.chain_cap, args.row_ms)}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    parts = []
    for p in result["points"]:
        curve = ", ".join(f"eps {q['eps']:g} x{q['ratio']}" for q in p["projected"])
        cpu = p.get("cpu", {})
        extra = f"; CPU eps {cpu['eps']}" if cpu.get("eps") is not None else ""
        parts.append(f"bs{p['batch']} t{p['temperature']:g}: tau x{p['tau_ratio']}, {curve}, "
                     f"trees win up to eps {p['trees_win_up_to_eps']}, measured x{p['measured_ratio']}{extra}")
    sys.stderr.write(f"{result['drafter']} trees / best chain: " + " | ".join(parts) + "\n")
    return 0
