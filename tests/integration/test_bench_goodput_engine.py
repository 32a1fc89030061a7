"""``specserve bench goodput`` end to end on tiny settings (real engines, demo model, fp32): every
arm runs at every closed-loop point, the tree arm verifies trees under the goodput controller,
and each point judges ``goodput`` against the baselines and the tree arm against the chain arms."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from specserve.bench import goodput
from specserve_vllm.spec_control.step_time import STEP_TERMS

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ARMS = ("none", "k2", "goodput", goodput.TREE_ARM)


def test_bench_goodput_runs_every_arm_and_judges_the_tree_arm(demo_model_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    goodput.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--arms", ",".join(ARMS), "--parts", "closed",
                              "--concurrency", "1,2", "--reps", "2", "--requests", "3", "--mean-output", "12",
                              "--prompt-tokens", "48", "--temperatures", "0", "--tree-budget", "6", "--seed", "2"])
    assert goodput.run(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    points = report["closed"]["t0"]
    assert set(points) == {"1", "2"}
    for clients, pt in points.items():
        assert set(pt["arms"]) == set(ARMS)
        # every engine step is counted by the requests the engine held, and every arm served the
        # same output tokens (ignore_eos, the same lengths)
        totals = {a: sum(c["tokens"] for c in pt["arms"][a]["by_requests"].values()) for a in ARMS}
        assert len(set(totals.values())) == 1 and totals["none"] > 0, totals
        assert {int(n) for a in ARMS for n in pt["arms"][a]["by_requests"]} <= set(range(1, int(clients) + 1))
        cells = [c for a in ARMS for c in pt["arms"][a]["by_requests"].values()]
        assert all(0 <= c["running_steps"] <= c["steps"] for c in cells)
        assert sum(c["steps"] - c["running_steps"] for c in cells) > 0  # every request's first step admits it
        assert all(pt["arms"][a]["reps"] == 2 and pt["arms"][a]["tokens_per_s"] > 0 for a in ARMS)
        assert pt["paired_throughput"]["best"] in {"none", "k2", "goodput"}
        # closed loops also judge the time every client was busy (the drain left out)
        assert pt["paired_full_load_throughput"]["best"] in {"none", "k2", "goodput"}
        assert all(0 < pt["arms"][a]["full_load_share"] <= 1 for a in ARMS)
        for key in ("tree_paired_latency", "tree_paired_throughput", "tree_paired_cpu_throughput"):
            assert pt[key]["best"] in ARMS and pt[key]["verdict"] in ("within", "beyond", "undecided")
        tree = pt["arms"][goodput.TREE_ARM]
        assert "plan" in tree and all(p["plans"] > 0 for p in tree["plan"])
        assert "trees_verified" not in pt["arms"]["goodput"]
        # each repetition shows the controller's step terms as it left them (the fit moves)
        terms = [p["step_terms"] for p in pt["arms"]["goodput"]["plan"]]
        assert all(set(t) == set(STEP_TERMS) and t["base"] > 0 for t in terms)
        assert "step_terms" not in pt["arms"]["k2"].get("plan", [{}])[0]
    # the controller tries trees at every batch size it has not priced yet (it may then keep
    # chains where they pay more), so the tree engine verified trees at some point
    tree_arms = [pt["arms"][goodput.TREE_ARM] for pt in points.values()]
    assert sum(a["trees_verified"] for a in tree_arms) > 0
    assert all(a["tree_nodes_accepted"] >= 0 for a in tree_arms)
    assert f"{goodput.TREE_ARM} against the best chain arm, paired:" in out.err
    # 2 points x 2 repetitions x 3 requests per arm, each a window no engine had served before
    assert report["prompts"]["served_per_arm"] == 12 and report["prompts"]["repeats_per_arm"] == 0
    assert report["prompts"]["distinct"] > 12


def test_interleaved_one_client_points_take_turns_by_request(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    arms = ("none", "k2", "goodput")
    tags: list[str] = []
    real = goodput.closed_loop

    def recording(engine: object, requests: list, clients: int, tag: str, steps: object = None) -> object:
        tags.append(tag)
        return real(engine, requests, clients, tag, steps=steps)

    monkeypatch.setattr(goodput, "closed_loop", recording)
    parser = argparse.ArgumentParser()
    goodput.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--arms", ",".join(arms), "--parts", "closed",
                              "--concurrency", "1,2", "--reps", "2", "--requests", "3", "--mean-output", "12",
                              "--prompt-tokens", "48", "--temperatures", "0", "--seed", "3", "--interleave"])
    assert goodput.run(args) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    one, two = report["closed"]["t0"]["1"], report["closed"]["t0"]["2"]
    # One client: one call per arm and request, every arm serving request i before any serves i + 1.
    turns = [t for t in tags if t.startswith("closed-1-")]
    assert len(turns) == 2 * 3 * len(arms)
    for rep in range(2):
        for i in range(3):
            block = turns[(rep * 3 + i) * len(arms): (rep * 3 + i + 1) * len(arms)]
            assert sorted(t.split("-")[3] for t in block) == sorted(arms)
            assert all(t.endswith(f"-{rep}-{i}") for t in block)
    run = [[[t.split("-")[3] for t in turns[(rep * 3 + i) * len(arms): (rep * 3 + i + 1) * len(arms)]]
            for i in range(3)] for rep in range(2)]
    assert one["orders"] == run  # the report names each request's turn order as run
    verdict = one["request_paired_latency"]
    assert verdict["best"] in arms and verdict["verdict"] in ("within", "beyond", "undecided")
    assert all(one["arms"][a]["reps"] == 2 and one["arms"][a]["tokens_per_s"] > 0 for a in arms)
    assert all(set(one["arms"][a]["by_requests"]) == {"1"} for a in arms)  # one request at a time
    # Two clients are not interleaved: one call per arm and repetition, no per-request verdict.
    assert len([t for t in tags if t.startswith("closed-2-")]) == 2 * len(arms)
    assert "request_paired_latency" not in two
    assert "by request" in out.err


def test_a_variant_arm_is_a_goodput_engine_with_its_settings_judged_as_a_variant(
        demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    names: dict[int, str] = {}
    reverts: dict[str, float] = {}
    real_engines, real_planner = goodput._engines, goodput._planner

    def engines(*a: object, **k: object) -> dict:
        built = real_engines(*a, **k)
        names.update({id(llm): arm for arm, llm in built.items()})
        return built

    def planner(llm: object) -> object:  # the planner exists once the engine has run a step
        found = real_planner(llm)
        if found is not None:
            reverts[names[id(llm)]] = found.policy.revert
        return found

    monkeypatch.setattr(goodput, "_engines", engines)
    monkeypatch.setattr(goodput, "_planner", planner)
    parser = argparse.ArgumentParser()
    goodput.add_arguments(parser)
    args = parser.parse_args(["--model", str(demo_model_dir), "--arms", "none,goodput,goodput-r1", "--parts", "closed",
                              "--concurrency", "2", "--reps", "2", "--requests", "3", "--mean-output", "12",
                              "--prompt-tokens", "48", "--temperatures", "0", "--seed", "5",
                              "--variant", 'r1={"revert": 1}'])
    assert goodput.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert reverts["goodput-r1"] == 1.0 and reverts["goodput"] < 1.0  # the variant's setting, its engine only
    pt = report["closed"]["t0"]["2"]
    assert "plan" in pt["arms"]["goodput-r1"]  # a goodput engine: its controller's figures
    assert set(pt["variants_paired_throughput"]) == {"goodput-r1"}  # judged as a variant, not a baseline
    assert pt["paired_throughput"]["best"] in ("none", "goodput")
    with pytest.raises(ValueError, match="goodput-r2"):  # an arm no --variant defines
        goodput.run(parser.parse_args(["--model", str(demo_model_dir), "--arms", "none,goodput-r2"]))
