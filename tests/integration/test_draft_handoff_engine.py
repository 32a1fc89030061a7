"""Drafts reach the engine core with the step's output (multiprocess engine, demo model, fp32).

With the engine core and the worker in separate processes (the CPU default), upstream vLLM
asks the worker for the drafts in a second call after every speculative step;
``compat.draft_handoff`` sends them with the step's output instead. A worker-side counter
shows no such call happened while the drafter drafted and its drafts were verified, and the
greedy outputs with speculation on equal those of the same requests at ``spec_k = 0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("drafter", ["recycling", "hydra"])
def test_no_second_call_for_drafts_and_outputs_unchanged(drafter: str) -> None:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run([sys.executable, "-m", "support.draft_rpc", drafter], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] > 0 and report["verified"] > 0, "the drafter drafted and drafts were verified"
    assert report["rpc_calls"] == 0, "the engine core called the worker for drafts"
    off, on = report["outputs"]
    assert off == on and all(len(o) == 24 for o in on)
