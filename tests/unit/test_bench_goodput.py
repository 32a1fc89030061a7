"""The spec-off and goodput benchmarks' arithmetic, the load drivers on a fake engine, the charts,
and the CLI."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from specserve.bench import goodput, load, spec_off
from specserve.cli import UsageError, build_parser


@pytest.mark.parametrize("name", ["specserve.bench.goodput", "specserve.bench.spec_off",
                                  "specserve.bench.load", "specserve.bench.stats", "specserve.bench.svg",
                                  "specserve.commands.calibrate"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0


def test_paired_ratios_pair_arms_within_a_repetition() -> None:
    runs = [{"none": 100.0, "a": 96.0}, {"none": 50.0, "a": 49.0}, {"none": 80.0, "a": 76.0}]
    assert spec_off.paired_ratios(runs, "a") == {"median": 0.96, "min": 0.95, "max": 0.98}


class _FakeEngine:
    """Finishes each request after ``steps`` engine steps, one token per step."""

    def __init__(self, steps: int = 3) -> None:
        self.steps, self.live = steps, {}

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        self.live[rid] = 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def get_num_unfinished_requests(self) -> int:
        return len(self.live)

    def step(self) -> list[Any]:
        out = []
        for rid in list(self.live):
            self.live[rid] += 1
            n = self.live[rid]
            out.append(SimpleNamespace(request_id=rid, finished=n == self.steps,
                                       outputs=[SimpleNamespace(token_ids=list(range(n)))]))
            if n == self.steps:
                del self.live[rid]
        return out


def test_open_loop_counts_every_request_and_token() -> None:
    times = [0.0, 0.001, 0.002, 0.003]
    steps: list[float] = []
    finished, span = load.open_loop(_FakeEngine(steps=3), [([1], None)] * 4, times, "t", on_step=steps.append)
    result = load.summarise(finished, span)
    assert [len(f.tokens) for f in finished] == [3, 3, 3, 3]
    assert all(f.sent <= f.first <= f.done for f in finished)
    assert result["tokens_per_s"] > 0 and result["latency_mean_s"] >= 0
    assert result["latency_p99_s"] >= result["latency_p50_s"]
    assert result["tpot_mean_ms"] >= 0 and result["looping_share"] == 0.0
    assert len(steps) >= 3 and steps == sorted(steps)


class _CountingEngine(_FakeEngine):
    """Also records the most requests it ever held at once."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.most = 0

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        super().add_request(rid, prompt, params)
        self.most = max(self.most, len(self.live))


@pytest.mark.parametrize("clients", [1, 3, 10])
def test_closed_loop_keeps_the_clients_busy_and_no_more(clients: int) -> None:
    engine = _CountingEngine(steps=2)
    finished, span = load.closed_loop(engine, [([1], None)] * 7, clients, "c")
    assert len(finished) == 7 and all(len(f.tokens) == 2 for f in finished)
    assert engine.most == min(clients, 7) and span > 0
    # a request is sent when another finishes: never before the first of the earlier ones ends
    if clients == 1:
        assert all(b.sent >= a.done for a, b in zip(finished, finished[1:]))
    # full load ends when a client finds nothing to send: at 3 clients the 7th request has just
    # been sent and the others have all their tokens (12 of 14); at 1 or 10 clients, at the end
    assert sum(f.full_load_tokens for f in finished) == {1: 14, 3: 12, 10: 14}[clients]
    assert finished[0].full_load_s > 0 and all(f.full_load_s == 0 for f in finished[1:])
    result = load.summarise(finished, span)
    assert 0 < result["full_load_share"] <= 1 and result["tokens_per_s_full_load"] > 0


def test_a_step_log_counts_every_step_and_token_by_the_requests_held() -> None:
    log = load.StepLog()
    finished, _ = load.closed_loop(_FakeEngine(steps=2), [([1], None)] * 5, 2, "s", steps=log)
    cells = log.summary()
    # 5 requests of 2 tokens at 2 clients: two full steps each for pairs 1-2 and 3-4, then
    # request 5 alone (sent when request 3 or 4 finished, so it overlaps neither)
    assert sum(c["tokens"] for c in cells.values()) == sum(len(f.tokens) for f in finished) == 10
    assert set(cells) == {"1", "2"} and cells["2"]["steps"] == 4 and cells["1"]["steps"] == 2
    assert cells["2"]["tokens_per_step"] == 2.0 and cells["1"]["tokens_per_step"] == 1.0
    # the steps after an admission prefill: 3 of 6 (requests 1-2, 3-4 and 5 each start a run)
    assert cells["2"]["running_steps"] == 2 and cells["1"]["running_steps"] == 1
    assert cells["2"]["running_tokens"] == 4 and cells["1"]["running_tokens"] == 1
    merged = load.merge_by_requests([cells, cells])
    assert merged["2"]["steps"] == 8 and merged["2"]["tokens"] == 16 and merged["2"]["running_steps"] == 4
    # the same rate (up to the third decimal each is rounded to)
    assert merged["2"]["tokens_per_ms"] == pytest.approx(cells["2"]["tokens_per_ms"], abs=2e-3)


def test_the_verdict_and_the_summary_name_the_best_arm() -> None:
    point = {"none": {"latency_mean_s": 1.0, "latency_mean_s_ci": 0.0},
             "k4": {"latency_mean_s": 2.0, "latency_mean_s_ci": 0.0},
             "goodput": {"latency_mean_s": 1.1, "latency_mean_s_ci": 0.0}}
    v = goodput.verdicts(point, "latency_mean_s", lower_is_better=True)
    assert v == {"best": "none", "ratio": 1.1, "within": False, "better_than_fixed": False}
    point["goodput"]["latency_mean_s_ci"] = 0.2  # a noisy measurement: within its CI
    assert goodput.verdicts(point, "latency_mean_s", lower_is_better=True)["within"] is True
    assert goodput.verdicts({"none": point["none"]}, "latency_mean_s", lower_is_better=True) is None


def test_plots_are_written_for_every_part(tmp_path: Any) -> None:
    arm = {"latency_mean_s": 1.0, "tokens_per_s": 5.0}
    report = {"drafter": "hydra",
              "open": {"t0": {"1": {"arms": {"none": arm, "goodput": arm}},
                              "2": {"arms": {"none": arm, "goodput": arm}}}},
              "closed": {"t0": {"1": {"arms": {"none": arm}}, "4": {"arms": {"none": arm}}}},
              "trace": {"goodput_steps": [[0.1, 1, 4.0], [0.2, 6, 1.0], [0.3, 1, 3.0]]}}
    written = goodput.write_plots(report, tmp_path)
    assert sorted(p.name for p in written) == ["goodput-latency-vs-rate-t0.svg", "goodput-step-trace.svg",
                                               "goodput-throughput-vs-clients-t0.svg"]
    trace = (tmp_path / "goodput-step-trace.svg").read_text()
    assert trace.count("<polyline") == 2 and "decode rows" in trace


def test_cli_knows_the_new_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "spec-off", "--reps", "2"])
    assert args.reps == 2 and args.drafters == "recycling,hydra"
    args = parser.parse_args(["bench", "goodput", "--rates", "1,2"])
    assert args.rates == "1,2" and "goodput" in args.arms and args.parts == "open" and not args.full
    args = parser.parse_args(["bench", "goodput", "--full", "--plots", "out"])
    assert args.full and str(args.plots) == "out"
    args = parser.parse_args(["calibrate", "--drafters", "recycling"])
    assert args.spec_ks == "0,1,2,4"
    args = parser.parse_args(["serve", "--drafter", "recycling", "--engine-spec-policy", "goodput"])
    assert args.engine_spec_policy == "goodput" and args.spec_policy in ("fixed", "goodput")


def test_every_arm_has_its_own_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A learning drafter's state must not pass between arms: fixed arms get an engine each."""
    import specserve.engine.local as local

    built: list[dict[str, Any]] = []

    def fake_llm(model_dir: Any, **kwargs: Any) -> object:
        built.append(kwargs)
        return object()

    monkeypatch.setattr(local, "local_llm", fake_llm)
    args = build_parser().parse_args(["bench", "goodput", "--drafter", "recycling",
                                      "--arms", "none,k0,k2,k3,goodput,goodput-pooled"])
    arms = args.arms.split(",")
    engines = goodput._engines(args, arms, Path("model"))
    assert sorted(engines) == sorted(arms)
    assert len({id(e) for e in engines.values()}) == len(arms)
    policies = [kw.get("additional_config", {}).get("specserve", {}).get("spec_policy") for kw in built]
    assert policies.count("fixed") == 3 and policies.count("goodput") == 2
    assert [goodput.fixed_k(a) for a in arms] == [None, 0, 2, 3, None, None]


def test_goodput_variants_are_not_baselines() -> None:
    assert goodput.GOODPUT_ARMS["goodput-every-step"] == {"recheck_on": 1}
    point = {"none": 1.0, "k2": 0.9, "goodput": 1.1, "goodput-every-step": 0.5, "goodput-pooled": 0.6}
    assert set(goodput.judged_arms(point)) == {"none", "k2", "goodput"}
    assert goodput.tree_judged_arms(point) == {}
    point[goodput.TREE_ARM] = 1.2
    assert set(goodput.judged_arms(point)) == {"none", "k2", "goodput"}
    assert set(goodput.tree_judged_arms(point)) == {"none", "k2", "goodput", goodput.TREE_ARM}


def test_the_summary_tallies_the_tree_arm_against_the_chain_arms() -> None:
    verdict = {"best": "none", "ratio": 1.0, "within": True, "better_than_fixed": False}
    paired = {"best": "none", "slowdown": 1.0, "low": 1.0, "high": 1.0, "verdict": "within"}
    tree = {"best": "k2", "slowdown": 1.2, "low": 1.1, "high": 1.3, "verdict": "beyond"}
    report: dict[str, Any] = {"drafter": "hydra", "open": {}, "closed": {"t0": {
        "1": {"verdict_throughput": verdict, "paired_throughput": paired, "tree_paired_throughput": tree},
        "8": {"verdict_throughput": verdict, "paired_throughput": paired,
              "tree_paired_throughput": {**tree, "verdict": "within"}}}}}
    line = goodput.summary_line(report)
    assert line.endswith("goodput-tree against the best chain arm, paired: 1 within 3%, 1 beyond, 0 undecided")
    for pt in report["closed"]["t0"].values():
        del pt["tree_paired_throughput"]
    assert "goodput-tree" not in goodput.summary_line(report)


def test_prompt_feed_gives_every_arm_the_same_prompts_and_counts_repeats() -> None:
    feed = goodput.PromptFeed([[i] for i in range(10)])
    for rep in range(3):
        got = {arm: feed.take(arm, 3) for arm in ("goodput", "none", "k2")}
        assert got["goodput"] == got["none"] == got["k2"] == [[3 * rep + i] for i in range(3)]
    assert feed.repeats == {}  # 9 of 10 windows served, none twice
    assert feed.take("none", 3) == [[9], [0], [1]] and feed.repeats == {"none": 2}


def test_goodput_variants_are_compared_with_the_default_request_by_request() -> None:
    out = goodput.request_paired({"none": [1.0, 2.0, 1.5], "goodput": [0.9, 1.8, 1.35],
                                  "goodput-no-hindsight": [1.0, 2.0, 1.5]})
    ratio = out["variants_request_paired_latency"]["goodput-no-hindsight"]
    assert ratio == {"ratio": 0.9, "low": 0.9, "high": 0.9}
    assert out["request_paired_latency"]["best"] == "goodput"
    assert "variants_request_paired_latency" not in goodput.request_paired({"none": [1.0], "goodput": [1.0]})


def test_variants_parse_to_goodput_arms_and_bad_ones_are_refused() -> None:
    from specserve.bench.goodput import goodput_arm, judged_arms, parse_variants, variant_verdicts

    arms = parse_variants(['old={"calibration": "a.json"}', ' r1 = {"revert": 1}'])
    assert arms == {"goodput-old": {"calibration": "a.json"}, "goodput-r1": {"revert": 1}}
    assert all(goodput_arm(a) for a in arms)
    for bad, match in (("noequals", "NAME=JSON"), ("=1", "NAME=JSON"), ("x={", "not JSON"),
                       ("x=[1]", "JSON object"), ("pooled={}", "built-in"),
                       ('x={"revrt": 1}', "no engine setting named revrt"), ('x={"revert": 2}', "revert must be in")):
        with pytest.raises(UsageError, match=match):
            parse_variants([bad])
    point = {"none": 1, "k2": 2, "goodput": 3, "goodput-old": 4}
    assert list(judged_arms(point)) == ["none", "k2", "goodput"]
    runs = {"k2": [{"tokens_per_s": 100.0}] * 2, "goodput": [{"tokens_per_s": 99.0}] * 2,
            "goodput-old": [{"tokens_per_s": 80.0}, {"tokens_per_s": 81.0}]}
    assert set(variant_verdicts(runs)["variants_paired_throughput"]) == {"goodput-old"}


def test_the_command_line_refuses_a_misspelt_variant_setting_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from specserve.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "goodput", "--arms", "none,goodput-x", "--variant", 'x={"revrt": 1}'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "no engine setting named revrt" in err
