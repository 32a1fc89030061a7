"""``specserve heads train`` / ``convert`` end to end on the demo model (a short run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from specserve_vllm.heads.checkpoint import load_heads


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_train_both_kinds_then_convert_medusa(tmp_path: Path) -> None:
    out = _cli("heads", "train", "--kind", "medusa,hydra", "--out-root", str(tmp_path), "--steps", "20",
               "--sequences", "16", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary) == {"medusa", "hydra"}
    assert "held-out top-1 per head" in out.stderr
    for kind in ("medusa", "hydra"):
        config, heads = load_heads(tmp_path / kind)
        assert config.kind == kind and config.num_heads == 4
        assert len(config.heldout_top1) == 4 and all(0.0 <= a <= 1.0 for a in config.heldout_top1)
        assert config.training["recipe"]["steps"] == 20
        assert config.target["fingerprint"]  # trained for the demo model
        assert summary[kind]["top1"] == config.heldout_top1
    converted = _cli("heads", "convert", "--heads", str(tmp_path / "medusa"), "--out", str(tmp_path / "vllm"))
    assert converted.returncode == 0, converted.stderr[-2000:]
    vllm_config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert vllm_config["architectures"] == ["MedusaModel"] and vllm_config["num_heads"] == 4
    assert (tmp_path / "vllm" / "model.safetensors").is_file()
    refused = _cli("heads", "convert", "--heads", str(tmp_path / "hydra"), "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and "only Medusa heads" in refused.stderr


def test_train_refuses_bad_arguments(tmp_path: Path) -> None:
    out = _cli("heads", "train", "--kind", "eagle", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "unknown" in out.stderr
    out = _cli("heads", "train", "--kind", "medusa,hydra", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "--out-root" in out.stderr
    out = _cli("heads", "train", "--kind", "medusa", "--prefix-attention", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "Hydra option" in out.stderr
