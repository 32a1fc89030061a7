"""The engine's grammar code loads no gateway code (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What an engine process imports of specserve for structured outputs: the grammar it serves, the
# compile check and its workers, and the patches that use them.
ENGINE_SIDE = (
    "specserve.structured.compile",
    "specserve.structured.served",
    "specserve.structured.engine_grammar",
    "specserve.structured.workers",
    "specserve_vllm.compat.grammar_validation",
)
# The gateway's side of structured outputs: the pre-check and the request edits.
GATEWAY_SIDE = ("specserve.structured.precheck", "specserve.structured.request", "specserve.structured.tools")

PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
from specserve_vllm.compat.grammar_validation import _checker
_checker().key("json", {"type": "object"})  # the engine's checker, as a request uses it
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_engine_grammar_modules_loads_no_gateway_code() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "plugins")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *ENGINE_SIDE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert set(ENGINE_SIDE) <= loaded
    gateway = sorted(m for m in loaded if m == "specserve.gateway" or m.startswith("specserve.gateway."))
    assert gateway == [], f"the engine's grammar modules loaded gateway modules: {gateway}"
    assert loaded.isdisjoint(GATEWAY_SIDE), sorted(loaded & set(GATEWAY_SIDE))
