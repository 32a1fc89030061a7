"""The engine's speculation-plan statistics on its ``/metrics``.

The planner lives in the engine-core process (with the model runner); ``/metrics`` is served by
vLLM's API server, another process. The planner's :class:`StatsPublisher` writes a snapshot of
its :class:`~specserve_vllm.spec_control.stats.PlanStats` to ``<dir>/engine-<pid>.json`` at most
every half second (only when it changed; atomic rename), and the API server's
:class:`PlanStatsCollector` reads every snapshot in ``<dir>`` at scrape time and sums them (one
file per engine core, so data-parallel cores add up). ``<dir>`` is ``$SPECSERVE_ENGINE_STATS_DIR``,
chosen by the API server process at plugin registration, before it starts its engine cores,
which inherit it. In-process engines (``vllm.LLM``) export nothing.

Families (all prefixed ``specserve_engine_``): plans, plans with no speculation, drafter calls,
decode rows and planned drafts, each also by batch-size bucket; decode rows by planned k;
per-position tested/accepted drafts; predicted and measured step time of the last step, and the
sum of absolute percentage errors over timed steps (MAPE = that sum / timed steps); under the
goodput policy, its live cost model (step-cost coefficients, online corrections, acceptance per
position), which the gateway prices requests with.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from specserve_vllm.spec_control.step_time import BUCKETS, DRAFT_TERMS

logger = logging.getLogger(__name__)

STATS_DIR_ENV = "SPECSERVE_ENGINE_STATS_DIR"
PUBLISH_INTERVAL_S = 0.5
PREFIX = "specserve_engine_"
_API_SERVER_MODULES = frozenset({"vllm.entrypoints.openai.api_server", "vllm.entrypoints.cli.main"})


def is_api_server(argv: Sequence[str], main_module: str | None) -> bool:
    """Whether this process is vLLM's OpenAI API server (``python -m ...api_server`` or ``vllm serve``).

    >>> is_api_server(["x"], "vllm.entrypoints.openai.api_server")
    True
    >>> is_api_server(["/usr/bin/vllm", "serve", "m"], None), is_api_server(["pytest"], None)
    (True, False)
    """
    if main_module in _API_SERVER_MODULES and (main_module != "vllm.entrypoints.cli.main" or "serve" in argv[1:2]):
        return True
    return bool(argv) and Path(argv[0]).name == "vllm" and argv[1:2] == ["serve"]


def prepare_stats_dir(environ: dict[str, str] | None = None) -> str | None:
    """In the API server process: choose the stats directory (once) and put it in the
    environment the engine cores inherit. Elsewhere: the directory already chosen, or ``None``."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    if environ.get(STATS_DIR_ENV):
        return environ[STATS_DIR_ENV]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not is_api_server(sys.argv, getattr(spec, "name", None)):
        return None
    environ[STATS_DIR_ENV] = tempfile.mkdtemp(prefix="specserve-engine-stats-")
    atexit.register(shutil.rmtree, environ[STATS_DIR_ENV], ignore_errors=True)
    return environ[STATS_DIR_ENV]


def write_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as JSON at ``path``; a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class StatsPublisher:
    """A daemon thread that writes ``snapshot()`` to ``path`` every ``interval_s`` when it changed.

    ``snapshot`` is called under ``lock``, the lock the planner holds while it updates its stats.
    """

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], lock: threading.Lock,
                 interval_s: float = PUBLISH_INTERVAL_S) -> None:
        self.path, self._snapshot, self._lock, self.interval_s = path, snapshot, lock, interval_s
        self._stop = threading.Event()
        self._last: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="specserve-stats", daemon=True)

    def start(self) -> StatsPublisher:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def publish(self) -> bool:
        """Write the snapshot now if it changed since the last write; whether it wrote."""
        with self._lock:
            data = self._snapshot()
        if data == self._last:
            return False
        write_atomically(self.path, data)
        self._last = data
        return True

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except OSError as exc:  # the directory was removed: the API server is gone
                logger.warning("plan stats not written", extra={"fields": {"path": str(self.path),
                                                                             "error": str(exc)}})
                return


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Every engine core's last snapshot in ``directory`` (unreadable files skipped)."""
    out = []
    for path in sorted(directory.glob("engine-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append(data)
    return out


def _add(into: dict[str, float], key: str, value: Any) -> None:
    into[key] = into.get(key, 0.0) + float(value or 0)


def _add_list(acc: list[float], values: Sequence[Any]) -> None:
    """Add ``values`` into ``acc`` element-wise, growing ``acc`` as needed.

    >>> acc = [1.0]; _add_list(acc, [1, 2]); acc
    [2.0, 2.0]
    """
    acc.extend([0.0] * (len(values) - len(acc)))
    for j, v in enumerate(values):
        acc[j] += float(v)


def combine(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The snapshots of several engine cores as one: counters summed, "last" gauges from the
    first core that has them.

    >>> one = {"steps": 2, "no_spec_steps": 1, "k_rows": {"0": 1, "4": 1}, "position_trials": [1],
    ...        "position_accepted": [1], "by_batch": {"1": {"plans": 2, "rows": 2, "drafts": 4, "no_spec": 1}}}
    >>> c = combine([one, one])
    >>> c["steps"], c["k_rows"], c["position_accepted"], c["by_batch"]["1"]["drafts"]
    (4.0, {'0': 2.0, '4': 2.0}, [2.0], 8.0)
    """
    total: dict[str, Any] = {"k_rows": {}, "by_batch": {}, "position_trials": [], "position_accepted": []}
    for snap in snapshots:
        for key in ("steps", "no_spec_steps", "drafter_calls", "decode_rows", "timed_steps", "abs_pct_error_sum",
                    "hindsight_rows", "hindsight_accepted"):
            _add(total, key, snap.get(key))
        for k, rows in (snap.get("k_rows") or {}).items():
            _add(total["k_rows"], str(k), rows)
        for bucket, counts in (snap.get("by_batch") or {}).items():
            into = total["by_batch"].setdefault(bucket, {})
            for name, value in counts.items():
                _add(into, name, value)
        for key in ("position_trials", "position_accepted"):
            _add_list(total[key], snap.get(key) or [])
        trees = snap.get("trees") or {}
        into_trees = total.setdefault("trees", {}) if trees else {}
        for name, value in trees.items():
            if isinstance(value, list):
                _add_list(into_trees.setdefault(name, []), value)
            else:
                _add(into_trees, name, value)
        for key in ("last_predicted_ms", "last_measured_ms", "policy", "model"):
            if key not in total and snap.get(key) is not None:
                total[key] = snap[key]
    return total


def metric_families(total: Mapping[str, Any]) -> Iterator[Any]:
    """Prometheus metric families of :func:`combine`'s result."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def counter(name: str, doc: str, value: float | None = None, labels: Sequence[str] = ()) -> Any:
        family = CounterMetricFamily(PREFIX + name, doc, labels=list(labels) or None)
        if value is not None:
            family.add_metric([], value)
        return family

    yield counter("spec_plans", "Steps planned by the speculation-length planner", total.get("steps", 0.0))
    yield counter("spec_no_spec_plans", "Plans of all zeros: the step ran without speculation",
                  total.get("no_spec_steps", 0.0))
    yield counter("spec_drafter_calls", "Times the drafter ran", total.get("drafter_calls", 0.0))
    yield counter("spec_decode_rows", "Decode rows over all plans", total.get("decode_rows", 0.0))
    yield counter("spec_hindsight_rows", "Rows of steps without drafts whose would-be first draft was scored",
                  total.get("hindsight_rows", 0.0))
    yield counter("spec_hindsight_accepted", "Summed acceptance probability of those would-be drafts",
                  total.get("hindsight_accepted", 0.0))
    rows_by_k = counter("spec_rows_by_k", "Decode rows planned at each draft length", labels=["k"])
    for k, rows in sorted(total.get("k_rows", {}).items(), key=lambda kv: int(kv[0])):
        rows_by_k.add_metric([k], rows)
    yield rows_by_k
    by_batch = total.get("by_batch", {})
    for name, key, doc in (
        ("spec_plans_by_batch", "plans", "Plans by batch-size bucket (decode rows)"),
        ("spec_rows_by_batch", "rows", "Decode rows by batch-size bucket"),
        ("spec_drafts_by_batch", "drafts", "Planned draft tokens by batch-size bucket (mean k = drafts / rows)"),
        ("spec_no_spec_plans_by_batch", "no_spec", "Plans with no speculation by batch-size bucket"),
    ):
        family = counter(name, doc, labels=["batch"])
        for bucket, counts in by_batch.items():
            family.add_metric([bucket], counts.get(key, 0.0))
        yield family
    for name, key, doc in (
        ("spec_position_tested", "position_trials", "Drafts verified at each position (every earlier one accepted)"),
        ("spec_position_accepted", "position_accepted", "Drafts accepted at each position"),
    ):
        family = counter(name, doc, labels=["position"])
        for j, value in enumerate(total.get(key, [])):
            family.add_metric([str(j + 1)], value)
        yield family
    yield counter("step_time_timed_steps", "Steps with a predicted and a measured time", total.get("timed_steps", 0.0))
    yield counter("step_time_abs_pct_error", "Sum over timed steps of |predicted - measured| / measured",
                  total.get("abs_pct_error_sum", 0.0))
    for name, key, doc in (("step_time_predicted_ms", "last_predicted_ms", "Predicted time of the last timed step"),
                           ("step_time_measured_ms", "last_measured_ms", "Measured time of the last step")):
        gauge = GaugeMetricFamily(PREFIX + name, doc)
        gauge.add_metric([], float(total.get(key) or 0.0))
        yield gauge
    if total.get("policy"):
        info = GaugeMetricFamily(PREFIX + "spec_policy", "The per-step speculation-length policy", labels=["policy"])
        info.add_metric([str(total["policy"])], 1.0)
        yield info
    yield from model_families(total.get("model"))
    yield from tree_families(total.get("trees"))


TREE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("tree_steps", "steps", "Steps that verified at least one draft tree"),
    ("tree_verifications", "verified", "Tree verifications (one per request and step)"),
    ("tree_accepted_nodes", "accepted_nodes", "Draft-tree nodes accepted"),
    ("tree_compactions", "compacted", "Accepted side branches whose K/V was moved to contiguous slots"),
    ("tree_grammar_verifications", "grammar", "Tree verifications of structured-output requests (grammar-pruned trees)"),
    ("tree_whole_batch_steps", "whole_batch", "Tree steps in which every request verified a tree (no rejection sampler)"),
    ("walked_chain_steps", "walked_chains", "Chain steps verified by walking the target's tokens (no rejection sampler)"),
)


def tree_families(trees: Mapping[str, Any] | None) -> Iterator[Any]:
    """Tree verification counters, and tested / accepted verifications per tree depth (1-based),
    summed over engine cores (with the chain steps verified by the walk); nothing until an engine
    verified a tree or walked a chain.

    >>> fams = list(tree_families({"steps": 2, "verified": 3, "accepted_nodes": 4, "compacted": 1,
    ...                             "depth_tested": [3, 2], "depth_accepted": [2, 2]}))
    >>> [(f.name, [s.value for s in f.samples]) for f in fams][-1]
    ('specserve_engine_tree_depth_accepted', [2.0, 2.0])
    """
    from prometheus_client.core import CounterMetricFamily

    if not trees:
        return
    for name, key, doc in TREE_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc)
        family.add_metric([], float(trees.get(key, 0.0)))
        yield family
    for name, key, doc in (("tree_depth_tested", "depth_tested", "Tree verifications that reached each depth"),
                           ("tree_depth_accepted", "depth_accepted", "Tree verifications that accepted a node at each depth")):
        family = CounterMetricFamily(PREFIX + name, doc, labels=["depth"])
        for d, value in enumerate(trees.get(key) or []):
            family.add_metric([str(d + 1)], float(value))
        yield family


def _gauge(name: str, doc: str, labels: Sequence[str], rows: Iterable[tuple[Sequence[str], Any]]) -> Any:
    """One gauge family: a sample per ``(label values, value)`` row."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    for values, value in rows:
        family.add_metric([str(v) for v in values], float(value))
    return family


def model_families(model: Mapping[str, Any] | None) -> Iterator[Any]:
    """The goodput policy's live cost model (first engine core's): step-cost coefficients (fitted
    online), the drafting corrections, and the engine-wide acceptance per position. The gateway
    reads them to price a request with the engine's own model (``specserve.gateway.engine_model``)."""
    if not model:
        return
    yield _gauge("step_cost_ms", "Step-time coefficient (ms): the calibration's, fitted online to measured steps",
                 ["term"], (((term,), value) for term, value in (model.get("cost") or {}).items()))
    yield _gauge("draft_correction_ratio",
                 "Online correction of the drafting time's terms (fixed, per draft, per draft position)",
                 ["term"], zip(((t,) for t in DRAFT_TERMS), model.get("draft_correction") or (1.0,) * len(DRAFT_TERMS)))
    yield _gauge("acceptance_estimate_ratio",
                 "Engine-wide conditional acceptance per draft position (the controller's estimate)", ["position"],
                 (((j + 1,), value) for j, value in enumerate(model.get("acceptance") or [])))
    if model.get("acceptance_by_class"):
        yield _gauge("acceptance_by_sampling_ratio",
                     "Engine-wide conditional acceptance per draft position, by the requests' sampling class "
                     "(greedy, le_0.5, le_1, gt_1 by temperature), for the classes seen",
                     ["sampling", "position"],
                     (((cls, j + 1), value) for cls, rates in model["acceptance_by_class"].items()
                      for j, value in enumerate(rates)))
    if "probes" in model:
        from prometheus_client.core import CounterMetricFamily

        probes = CounterMetricFamily(PREFIX + "spec_probes",
                                     "Steps the controller speculated only to measure again, after "
                                     "probe_every steps without speculation")
        probes.add_metric([], float(model["probes"]))
        yield probes
    if "tree_gain" in model:  # trees on: their learned price against chains
        yield _gauge("tree_gain_ratio", "Accepted drafts of a tree over a chain's, by the tree's node count (learned)",
                     ["nodes"], (((j + 1,), value) for j, value in enumerate(model.get("tree_gain") or [])))
        yield _gauge("tree_cost_ratio", "Step time with trees over the chain price of the same drafts (learned)",
                     ["bucket"], (((bucket,), value) for bucket, value in zip(BUCKETS, model.get("tree_cost") or [])))


class PlanStatsCollector:
    """A Prometheus collector over the snapshots in one directory (read at each scrape)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        yield from metric_families(combine(read_snapshots(self.directory)))


_REGISTERED: dict[str, PlanStatsCollector] = {}


def register_collector(directory: str) -> None:
    """Add the collector to the registry vLLM's ``/metrics`` serves (once per process)."""
    if directory in _REGISTERED:
        return
    from prometheus_client import REGISTRY

    collector = PlanStatsCollector(Path(directory))
    REGISTRY.register(collector)  # type: ignore[arg-type]
    _REGISTERED[directory] = collector


def setup_api_server() -> None:
    """At plugin registration: in vLLM's API server, choose the directory and serve its stats."""
    directory = prepare_stats_dir()
    if directory and is_api_server(sys.argv, getattr(getattr(sys.modules.get("__main__"), "__spec__", None),
                                                     "name", None)):
        register_collector(directory)


def publisher_path(pid: int | None = None) -> Path | None:
    """Where this engine core writes (``None`` when no API server asked for stats)."""
    directory = os.environ.get(STATS_DIR_ENV)
    return Path(directory) / f"engine-{os.getpid() if pid is None else pid}.json" if directory else None


__all__ = ["PlanStatsCollector", "STATS_DIR_ENV", "StatsPublisher", "combine", "is_api_server",
           "metric_families", "model_families", "tree_families", "prepare_stats_dir", "publisher_path", "read_snapshots",
           "register_collector", "setup_api_server"]
