"""``--drafter`` names -> the engine's speculative config (gateway side, no vLLM import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specserve.speculative_config import DRAFTERS, HEAD_CLASS_PATHS, RECYCLING_CLASS_PATH, speculative_config


def test_none_disables_speculation() -> None:
    assert speculative_config("none", 4) is None


@pytest.mark.parametrize("drafter", ["recycling", "ngram", "medusa", "hydra"])
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


def test_head_drafters_point_at_the_plugin_proposers() -> None:
    from specserve_vllm.heads import proposer

    for kind, cls in (("medusa", proposer.MedusaProposer), ("hydra", proposer.HydraProposer)):
        assert HEAD_CLASS_PATHS[kind] == f"{cls.__module__}.{cls.__qualname__}"
        assert speculative_config(kind, 2) == {"method": "custom_class", "model": HEAD_CLASS_PATHS[kind],  # type: ignore[arg-type]
                                               "num_speculative_tokens": 2}


def test_vllm_medusa_needs_converted_heads() -> None:
    with pytest.raises(ValueError, match="converted head checkpoint"):
        speculative_config("vllm-medusa", 4)
    assert speculative_config("vllm-medusa", 4, heads="/h") == {"method": "medusa", "model": "/h",
                                                                "num_speculative_tokens": 4}


def test_resolve_heads() -> None:
    from specserve.head_training import resolve_heads

    assert resolve_heads("ngram", None, is_demo=True) is None
    assert resolve_heads("hydra", "/x/heads", is_demo=False) == "/x/heads"
    with pytest.raises(ValueError, match="needs --heads"):
        resolve_heads("medusa", None, is_demo=False)
    shipped = resolve_heads("medusa", None, is_demo=True)
    assert shipped is not None and shipped.endswith("artifact/medusa")


@pytest.mark.parametrize(("drafter", "k"), [("medusa2", 4), ("ngram", 0), ("recycling", -1), ("ngram", 2.0)])
def test_rejects_bad_input(drafter: str, k: object) -> None:
    with pytest.raises(ValueError):
        speculative_config(drafter, k)  # type: ignore[arg-type]


def test_imports_without_torch_or_vllm() -> None:
    code = "import sys, specserve.speculative_config; print('torch' in sys.modules or 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert set(DRAFTERS) >= {"recycling", "ngram", "none"}
