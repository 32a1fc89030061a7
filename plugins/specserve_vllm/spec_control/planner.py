"""The engine's per-step spec-length planner: policy choice from the engine config, plus stats.

The policy comes from vLLM's ``additional_config`` (``--additional-config``), key
``specserve``::

    {"specserve": {"spec_policy": "goodput", "calibration": "/path/calibration.json"}}

or, when that is absent, from the environment (``SPECSERVE_ENGINE_SPEC_POLICY``,
``SPECSERVE_ENGINE_CALIBRATION``; not the gateway's ``SPECSERVE_SPEC_POLICY``, which the engine
process inherits under ``specserve serve``). Default here: ``fixed`` (every decode row drafts its cap), so
vLLM used directly with a speculative config drafts its k as vLLM does; specserve's own entry points
(``specserve serve``, Helm, compose) default to :data:`SERVED_POLICY`. Pure apart from reading that
config: no vLLM import.

    >>> settings_from({"specserve": {"spec_policy": "off"}}, env={}).policy
    'off'
    >>> settings_from({}, env={"SPECSERVE_ENGINE_SPEC_POLICY": "goodput"}).policy
    'goodput'
    >>> settings_from(None, env={}).policy
    'fixed'
"""

from __future__ import annotations

import dataclasses

import logging
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from specserve_vllm.spec_control.acceptance import REVERT
from specserve_vllm.spec_control.plan import (
    POLICIES,
    PREFILL_ESTIMATES,
    FixedPolicy,
    JitterPolicy,
    OffPolicy,
    SpecLengthPolicy,
    StepRows,
    VerifiedRows,
    clip_plan,
    plan_key,
)
from specserve_vllm.spec_control.stats import PlanStats

logger = logging.getLogger(__name__)

CONFIG_KEY = "specserve"
"""Key of specserve's settings in vLLM's ``additional_config``."""
POLICY_ENV = "SPECSERVE_ENGINE_SPEC_POLICY"
CALIBRATION_ENV = "SPECSERVE_ENGINE_CALIBRATION"
DEFAULT_POLICY = "fixed"
"""The policy of an engine whose config and environment name none (vLLM with the plugin)."""
SERVED_POLICY = "goodput"
"""The policy ``specserve serve``, the Helm chart and compose give a speculative engine unless told
otherwise: lengths chosen each step for speed, so speculation never costs much under load or
with a drafter that misses (docs/speculation-control.md#the-default)."""


CHAIN_VERIFIERS = ("walk", "rejection")
"""Values of ``chain_verify``."""


class InvalidSpecPolicy(ValueError):
    """An unknown ``spec_policy`` name."""


@dataclass(frozen=True)
class PlannerSettings:
    """How the engine chooses draft lengths each step."""

    policy: str = DEFAULT_POLICY
    """One of :data:`~specserve_vllm.spec_control.plan.POLICIES`."""
    calibration: str | None = None
    """Step-time calibration JSON for ``goodput`` (None: the shipped default)."""
    seed: int = 0
    """Seed of the ``jitter`` policy."""
    log_every: int = 0
    """Log plan statistics every this many steps (0: never)."""
    recheck_on: int = 4
    """``goodput``: a speculating chain plan is reused for up to this many steps while the batch
    is unchanged (1: a decision every step), spreading a decision's cost over them."""
    sampling_classes: bool = True
    """``goodput``: keep the engine-wide acceptance per sampling class (greedy, and temperature
    buckets), so greedy and sampled requests are priced at their own rates; ``False``: one rate
    for all requests (the earlier behaviour, kept for comparison)."""
    hindsight: bool = True
    """``goodput``: score the chain draft that steps without drafts would have had, where the
    drafter can (Token Recycling's chains), as evidence at the first position
    (:mod:`specserve_vllm.drafters.hindsight`); ``False``: learn only from verified drafts."""
    time_plain_every: int = 4
    """The step timer times every step that verifies drafts or prefills; of a run of plain decode
    steps, the first :data:`PLAIN_RUN_TIMED`, then one in this many (1: every step). Describing
    and fitting a step costs 20-50 µs right after the forward pass, 1-2% of a CPU step, and a
    long run without drafts repeats the same few shapes."""
    fit_alpha: float = 0.1
    """``goodput``: weight of each measured step in the online step-time fit
    (:class:`~specserve_vllm.spec_control.step_time.TermFit`); its memory is about ``1 / fit_alpha``
    steps."""
    revert: float = REVERT
    """``goodput``: per step a sampling class's acceptance is not measured (speculation off, a
    drafter without hindsight), its recent rate keeps this share of its distance to the class's
    long-run rate (:meth:`~specserve_vllm.spec_control.acceptance.AcceptanceModel.revert`; about
    35 steps to halve it). 1: the rate stays where it was when speculation stopped (the
    earlier behaviour)."""
    prefill_estimate: str = "next"
    """``goodput``: the prefill tokens the next step is priced with: ``next`` (what chunked
    prompts in the batch still have to prefill) or ``last`` (the last step's; the earlier
    behaviour)."""
    chain_verify: str = "walk"
    """How chain steps are verified: ``walk`` (the target's own token per row, as trees are, where
    the batch allows; :mod:`specserve_vllm.compat.chain_walk`) or ``rejection`` (vLLM's rejection
    sampler on every step). Both are lossless."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidSpecPolicy(f"spec_policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.chain_verify not in CHAIN_VERIFIERS:
            raise ValueError(f"chain_verify must be one of {', '.join(CHAIN_VERIFIERS)}, got {self.chain_verify!r}")
        if not 0.0 < self.fit_alpha <= 1.0:
            raise ValueError(f"fit_alpha must be in (0, 1], got {self.fit_alpha!r}")
        if not 0.0 <= self.revert <= 1.0:
            raise ValueError(f"revert must be in [0, 1], got {self.revert!r}")
        if self.prefill_estimate not in PREFILL_ESTIMATES:
            raise ValueError(f"prefill_estimate must be one of {', '.join(PREFILL_ESTIMATES)}, "
                             f"got {self.prefill_estimate!r}")


CONFIG_NAMES: tuple[str, ...] = ("spec_policy", "calibration", "seed", "log_every", "sampling_classes", "recheck_on",
                                 "chain_verify", "time_plain_every", "hindsight", "fit_alpha", "revert",
                                 "prefill_estimate")
"""The names :func:`settings_from` reads under :data:`CONFIG_KEY`."""


def unknown_settings(ours: Mapping[str, Any]) -> list[str]:
    """The names in ``ours`` (specserve's part of ``additional_config``) that no setting reads:
    a misspelt setting would otherwise be ignored without a word.

    >>> unknown_settings({"revert": 1, "revrt": 1})
    ['revrt']
    """
    return [name for name in ours if name not in CONFIG_NAMES]


def settings_from(additional_config: Any, env: Mapping[str, str] | None = None) -> PlannerSettings:
    """:class:`PlannerSettings` from vLLM's ``additional_config`` or, failing that, ``env``."""
    env = os.environ if env is None else env
    ours = additional_config.get(CONFIG_KEY) if isinstance(additional_config, Mapping) else None
    ours = ours if isinstance(ours, Mapping) else {}
    unknown = unknown_settings(ours)
    if unknown:
        logger.warning("unknown engine settings ignored", extra={"fields": {"names": unknown, "known": list(CONFIG_NAMES)}})
    return PlannerSettings(
        policy=str(ours.get("spec_policy") or env.get(POLICY_ENV) or DEFAULT_POLICY),
        calibration=ours.get("calibration") or env.get(CALIBRATION_ENV) or None,
        seed=int(ours.get("seed", 0)),
        log_every=int(ours.get("log_every", 0)),
        sampling_classes=bool(ours.get("sampling_classes", True)),
        recheck_on=max(1, int(ours.get("recheck_on", 4))),
        chain_verify=str(ours.get("chain_verify", "walk")),
        time_plain_every=max(1, int(ours.get("time_plain_every", 4))),
        hindsight=bool(ours.get("hindsight", True)),
        fit_alpha=float(ours.get("fit_alpha", PlannerSettings.fit_alpha)),
        revert=float(ours.get("revert", PlannerSettings.revert)),
        prefill_estimate=str(ours.get("prefill_estimate", PlannerSettings.prefill_estimate)),
    )


def build_policy(settings: PlannerSettings, num_speculative_tokens: int, drafter: str, tree: str = "chain",
                 chain_depth: int | None = None) -> SpecLengthPolicy:
    """The policy object ``settings`` names (``drafter``: the proposer's class name, for priors;
    ``tree``: the drafter's draft shape; ``chain_depth``: its longest chain, if below the k)."""
    if settings.policy == "off":
        return OffPolicy()
    if settings.policy == "jitter":
        return JitterPolicy(settings.seed)
    if settings.policy == "goodput":
        from specserve_vllm.spec_control.goodput import GoodputPolicy

        return GoodputPolicy.from_settings(settings, num_speculative_tokens, drafter, tree=tree,
                                           chain_depth=chain_depth)
    return FixedPolicy()


PLAIN_RUN_TIMED = 4
"""Plain decode steps in a row that the step timer always times (:func:`times_plain_step`)."""


def times_plain_step(run: int, every: int, head: int = PLAIN_RUN_TIMED) -> bool:
    """Whether the ``run``-th plain decode step in a row (from 1) is timed: the first ``head``,
    then one in ``every``.

    >>> [n for n in range(1, 20) if times_plain_step(n, 4)]
    [1, 2, 3, 4, 8, 12, 16]
    >>> all(times_plain_step(n, 1) for n in range(1, 50))
    True
    """
    return run <= head or run % every == 0


class StepPlanner:
    """One per runner: turns the batch into a plan through the policy, and counts."""

    def __init__(self, policy: SpecLengthPolicy, num_speculative_tokens: int, log_every: int = 0,
                 keep_records: int = 4096, time_plain_every: int = PlannerSettings.time_plain_every) -> None:
        self.policy = policy
        self.num_speculative_tokens = num_speculative_tokens
        self.stats = PlanStats()
        self.log_every = log_every
        self.records: deque[Any] = deque(maxlen=keep_records)
        """The last measured steps (``compat.step_timer.StepRecord``), for calibration."""
        self._draft_timing = (0, 0, 0.0)
        self.lock = threading.Lock()
        """Held while the stats change, and by :meth:`snapshot` (read from a publishing thread)."""
        self.publisher: Any = None
        self.trees: Any = None
        """The engine's tree counters (``tree.step.TreeCounters``) once it verified a tree."""
        self._reuse = getattr(policy, "reuse", None)
        """The policy's held-plan lookup (``GoodputPolicy.reuse``), if it holds plans."""
        self.hindsight = False
        """The drafter keeps hindsight for the policy (:meth:`observe_hindsight` before decisions)."""
        self.spec_ks: dict[str, int | None] = {}
        """Each running request's ``spec_k``, parsed once (dropped when it finishes)."""
        self.time_plain_every = time_plain_every
        """See :attr:`PlannerSettings.time_plain_every` (:meth:`times`)."""
        self._plain_run = 0
        """Plain decode steps in a row so far."""

    def snapshot(self) -> dict[str, Any]:
        """The stats, the policy's name, its cost model and the tree counters (call under :attr:`lock`)."""
        model_state = getattr(self.policy, "model_state", None)
        model = {"model": model_state()} if callable(model_state) else {}
        trees = {"trees": dataclasses.asdict(self.trees)} if self.trees is not None else {}
        return {**self.stats.snapshot(), "policy": self.policy.name, **model, **trees}

    def publish_to(self, path: Any) -> None:
        """Write :meth:`snapshot` to ``path`` in the background (the API server's ``/metrics``)."""
        from specserve_vllm.spec_control.export import StatsPublisher

        if self.publisher is None:
            self.publisher = StatsPublisher(path, self.snapshot, self.lock).start()

    def record_drafting(self, drafts: int, depth: int, ms: float) -> None:
        """The drafter ran this step: ``drafts`` tokens, the longest row ``depth`` of them, in ``ms``."""
        self._draft_timing = (drafts, depth, ms)
        with self.lock:
            self.stats.drafter_calls += 1

    def take_draft_timing(self) -> tuple[int, int, float]:
        """``(drafts, depth, ms)`` of this step's drafting (zeros when the drafter did not run)."""
        timing, self._draft_timing = self._draft_timing, (0, 0, 0.0)
        return timing

    def times(self, spec: bool, decode_only: bool) -> bool:
        """Whether the step timer describes and times this step: every step that verifies drafts
        (``spec``) or prefills (not ``decode_only``), and plain decode steps as
        :func:`times_plain_step` says. A step left out goes to :meth:`skip_step` instead.

        >>> p = StepPlanner(FixedPolicy(), 4, time_plain_every=4)
        >>> [p.times(False, True) for _ in range(6)] + [p.times(True, True), p.times(False, True)]
        [True, True, True, True, False, False, True, True]
        """
        if spec or not decode_only:
            self._plain_run = 0
            return True
        self._plain_run += 1
        return times_plain_step(self._plain_run, self.time_plain_every)

    def skip_step(self) -> None:
        """A step the timer left out (:meth:`times`): the drafting at its end, if the plan
        drafted, still teaches the policy the drafting cost."""
        drafts, depth, ms = self.take_draft_timing()
        observe = getattr(self.policy, "observe_drafting", None)
        if drafts and callable(observe):
            observe(drafts, ms, depth)

    def observe_step(self, record: Any) -> None:
        """A measured step: kept, passed to the policy, and its prediction error counted."""
        self.records.append(record)
        observe = getattr(self.policy, "observe_step", None)
        predicted = 0.0
        if callable(observe):
            predicted = observe(record.rows, record.tokens, record.ctx_tokens, record.spec,
                                record.prefill_tokens, record.step_ms, record.drafts, record.draft_ms,
                                getattr(record, "trees", 0), getattr(record, "drafts_verified", 0),
                                getattr(record, "draft_depth", 0), getattr(record, "sampled", 0))
        with self.lock:
            self.stats.record_time(predicted, record.total_ms)

    def caps(self, spec_ks: Sequence[int | None], sampled: Sequence[int],
             room: Sequence[int | None] | None = None) -> list[int]:
        """Each row's cap: its ``spec_k`` (or the engine's k), bounded by the engine's k, and 0
        unless it sampled a token this step (a decode row next step). ``room``: output tokens
        each row may still produce (``None``: unbounded); a step commits at most that many, one
        of them the target's own, so a row drafts at most ``room - 1``.

        >>> planner = StepPlanner(FixedPolicy(), 4)
        >>> planner.caps([None, 2, 9, 3], [1, 1, 1, 0])
        [4, 2, 4, 0]
        >>> planner.caps([None, None, None, 2], [1, 1, 1, 1], room=[None, 3, 1, 0])
        [4, 2, 0, 0]
        """
        k = self.num_speculative_tokens
        caps = [0 if not n else (k if c is None else min(c, k)) for c, n in zip(spec_ks, sampled)]
        if room is not None:
            caps = [c if r is None else max(0, min(c, r - 1)) for c, r in zip(caps, room)]
        return caps

    @staticmethod
    def rows(req_ids: Sequence[str], caps: Sequence[int], context: Any,
             classes: np.ndarray | None = None, prefill: int = 0) -> StepRows:
        """The batch as the policy reads it: rows with their :meth:`caps`, context lengths and
        sampling classes (``None``: all greedy), and the prompt tokens still to prefill."""
        return StepRows(req_ids=tuple(req_ids), caps=np.array(caps, dtype=np.int64),
                        context=np.asarray(context, dtype=np.int64), classes=classes, prefill=prefill)

    def reuse(self, req_ids: Sequence[str], caps: Sequence[int]) -> np.ndarray | None:
        """The plan the policy holds for this batch (counted as a plan; read-only), or ``None``
        when it must decide (:meth:`plan`). Asked before the batch is described as
        :class:`StepRows`, so a held step costs a tuple comparison and the counters.

        >>> StepPlanner(FixedPolicy(), 4).reuse(["a"], [4]) is None   # fixed holds nothing
        True
        """
        if self._reuse is None:
            return None
        held = self._reuse(plan_key(req_ids, caps))
        if held is None:
            return None
        with self.lock:
            self.stats.record_plan(held.decode)
        self._maybe_log()
        return held.plan

    def plan(self, rows: StepRows) -> np.ndarray:
        """``[n]`` draft lengths for the next step (clipped to the caps) and count them."""
        lengths = clip_plan(self.policy.plan(rows), rows.caps)
        with self.lock:
            self.stats.record_plan(lengths[rows.caps > 0].tolist())
        self._maybe_log()
        return lengths

    def plan_nothing(self) -> None:
        """Count a step in which no row may draft (what :meth:`plan` counts for all-zero caps,
        without asking the policy: every policy plans zeros there)."""
        with self.lock:
            self.stats.record_plan(())
        self._maybe_log()

    def _maybe_log(self) -> None:
        if self.log_every and self.stats.steps % self.log_every == 0:
            logger.info("spec plan", extra={"fields": {"policy": self.policy.name, **self.stats.snapshot()}})

    def observe_hindsight(self, req_ids: list[str], temperatures: np.ndarray, probability: np.ndarray) -> None:
        """Hindsight rows from the drafter (:mod:`specserve_vllm.drafters.hindsight`), passed to
        a policy that learns from them, and counted."""
        if not len(req_ids):
            return
        with self.lock:
            self.stats.hindsight_rows += len(req_ids)
            self.stats.hindsight_accepted += float(probability.sum())
        observe = getattr(self.policy, "observe_hindsight", None)
        if callable(observe):
            from specserve_vllm.spec_control.acceptance import sampling_class

            observe(req_ids, [sampling_class(t) for t in temperatures.tolist()], probability)

    def observe(self, verified: VerifiedRows) -> None:
        if len(verified.req_ids):
            with self.lock:
                self.stats.record_verified_rows(verified.drafted, verified.accepted)
            self.policy.observe(verified)

    def finished(self, req_ids: frozenset[str]) -> None:
        for req_id in req_ids:
            self.spec_ks.pop(req_id, None)
        if req_ids:
            self.policy.finished(req_ids)
