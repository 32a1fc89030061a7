"""Shared test setup: folder markers and the fast-CPU environment for in-process vLLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fast, deterministic vLLM on 2 CPU cores (see docs/development.md).
for _k, _v in {
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "OMP_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(_HERE.resolve())
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        if folder in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model directory (built or found in the cache; see `specserve demo-model`)."""
    from specserve.demo import demo_model_dir as _dir

    return _dir()
