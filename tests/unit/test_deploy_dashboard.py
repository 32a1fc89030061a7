"""The provisioned Grafana dashboard: it loads, covers what operators need, and every query names
metrics that specserve's gateway or vLLM actually export (the live check is in
tests/e2e/test_prometheus_scrape.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "specserve.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels and keywords left out).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{job="x"}[1m])) / ignoring(le) b_total + 1'))
    ['a_bucket', 'b_total']
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_loads_with_unique_ids_and_non_overlapping_panels(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (mine & cells), p["title"]
        cells |= mine
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_dashboard_covers_the_operator_questions(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "p50 / p99", "time to first token", "tokens per second",
                  "acceptance rate per drafter", "speculation length", "replica health"):
        assert topic in titles, topic
    exprs = {title: " ".join(e for t, e in panel_queries(dashboard) if t == title)
             for title in {t for t, _ in panel_queries(dashboard)}}
    acceptance = exprs["Draft acceptance rate per drafter"]
    assert "vllm:spec_decode_num_accepted_tokens_total" in acceptance
    assert "vllm:spec_decode_num_draft_tokens_total" in acceptance
    assert "by (drafter)" in acceptance
    latency = exprs["Request latency p50 / p99"]
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency


def _gateway_metric_names() -> set[str]:
    from specserve.gateway.metrics import GatewayMetrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    names = set()
    for family in GatewayMetrics(CollectorRegistry()).registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@cache
def _vllm_sources() -> str:
    spec = importlib.util.find_spec("vllm")  # located, not imported (no torch start-up)
    assert spec is not None and spec.origin is not None
    return "\n".join(p.read_text(errors="ignore") for p in (Path(spec.origin).parent / "v1").rglob("*.py"))


def _vllm_metric_exists(name: str) -> bool:
    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
    return f'"{base}"' in _vllm_sources()


def test_every_query_names_a_metric_that_is_exported(dashboard: dict[str, Any]) -> None:
    gateway = _gateway_metric_names()
    seen = set()
    for title, expr in panel_queries(dashboard):
        names = metric_names(expr)
        assert names, (title, expr)
        for name in names:
            seen.add(name)
            if name.startswith("specserve_"):
                assert name in gateway, (title, name)
            elif name.startswith("vllm:"):
                assert _vllm_metric_exists(name), (title, name)
            else:
                assert name == "up", (title, name)
    assert any(n.startswith("specserve_") for n in seen) and any(n.startswith("vllm:") for n in seen)


def test_metric_name_extraction() -> None:
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}
    assert metric_names('min by (job) (up{job=~"a.*"})') == {"up"}
    assert metric_names("1 + sum(rate(a[1m])) / sum(rate(b[1m]))") == {"a", "b"}
