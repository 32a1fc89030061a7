"""``--drafter`` names -> the engine's speculative config (gateway side, no vLLM import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specserve.drafters import DRAFTERS, RECYCLING_CLASS_PATH, speculative_config


def test_none_disables_speculation() -> None:
    assert speculative_config("none", 4) is None


@pytest.mark.parametrize("drafter", ["recycling", "ngram"])
def test_config_is_json_with_k(drafter: str) -> None:
    cfg = speculative_config(drafter, 5)  # type: ignore[arg-type]
    assert cfg is not None
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["num_speculative_tokens"] == 5


def test_recycling_points_at_the_plugin_proposer() -> None:
    from specserve_vllm.drafters.recycling_proposer import CLASS_PATH

    assert RECYCLING_CLASS_PATH == CLASS_PATH
    assert speculative_config("recycling", 3) == {
        "method": "custom_class",
        "model": CLASS_PATH,
        "num_speculative_tokens": 3,
    }


@pytest.mark.parametrize(("drafter", "k"), [("medusa2", 4), ("ngram", 0), ("recycling", -1), ("ngram", 2.0)])
def test_rejects_bad_input(drafter: str, k: object) -> None:
    with pytest.raises(ValueError):
        speculative_config(drafter, k)  # type: ignore[arg-type]


def test_imports_without_torch_or_vllm() -> None:
    code = "import sys, specserve.drafters; print('torch' in sys.modules or 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert set(DRAFTERS) >= {"recycling", "ngram", "none"}
