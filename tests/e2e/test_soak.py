"""A short ``specserve bench soak``: mixed traffic through ``specserve serve --drafter hydra``,
every answer checked (correctness only; the timed soak with resource figures is the bench).

The mix: greedy chat/completions, streaming and not (equal to a reference engine without
speculation), ``response_format`` json_schema (valid), seeded sampling with ``n=2``, streams the
client drops, malformed requests (OpenAI-shaped 4xx). At the end the engine's running/waiting
gauges and the gateway's in-flight gauges are back to 0.
"""

from __future__ import annotations

import random
from pathlib import Path


from specserve.bench.soak import SoakConfig, run_soak
from specserve.bench.soak_traffic import Traffic


def test_short_soak_every_answer_is_correct(demo_model_dir: Path, tmp_path: Path) -> None:
    config = SoakConfig(duration_s=60.0, concurrency=4, sample_every_s=20.0, model=str(demo_model_dir),
                        log_dir=str(tmp_path))
    report = run_soak(config)
    failures = report["failures"]
    assert report["server_errors"] == 0, failures
    assert report["invalid_structured_outputs"] == 0, failures
    assert report["greedy_mismatches"] == 0, failures
    assert report["checks"]["every_request_ok"], (report["outcomes"], failures)
    assert report["checks"]["gauges_back_to_zero"], report["gauges_at_end"]
    # The gateway compiled every constraint and said so: the engine compiled none again.
    assert report["engine_compile_workers"] == 0, report["engine_compile_workers"]
    # Every kind of request was really sent: each deck of draws holds every kind.
    traffic = Traffic("m", {}, random.Random(0))
    assert report["requests"] >= traffic.deck_size, report["requests"]
    assert set(report["outcomes"]) == set(traffic.kinds), report["outcomes"]
