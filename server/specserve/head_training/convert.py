"""Convert specserve Medusa heads to the checkpoint format of vLLM's own Medusa proposer.

Our Medusa head ``i`` is ``ResidualStack`` blocks ``x + SiLU(A x + b)`` scored with the target's
LM head: exactly vLLM's ``Medusa`` model with ``medusa_fc_bias`` and ``original_lm_head`` (one
shared LM head), so the weights map one to one (``blocks.{i}.layers.{j}.{weight,bias}``) and the
target's LM head is copied in as ``lm_head.weight``. Both proposers then draft the same tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from specserve_vllm.heads.config import CheckpointError


def vllm_medusa_config(config: Any) -> dict[str, Any]:
    """vLLM ``MedusaConfig`` fields for our Medusa ``config``.

    >>> from specserve_vllm.heads.config import HeadsConfig
    >>> c = vllm_medusa_config(HeadsConfig(kind="medusa", num_heads=4, hidden_size=8, vocab_size=16))
    >>> c["architectures"], c["num_heads"], c["original_lm_head"]
    (['MedusaModel'], 4, True)
    """
    if config.kind != "medusa":
        raise CheckpointError(f"only Medusa heads have a vLLM equivalent, not {config.kind}")
    return {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "truncated_vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": True,
    }


def convert_to_vllm_medusa(heads_dir: Path, model_dir: Path, out: Path) -> Path:
    """Write vLLM's Medusa checkpoint for ``heads_dir`` (trained on ``model_dir``) into ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    from specserve.head_training.data import load_target
    from specserve_vllm.heads.config import WEIGHTS_FILE, read_config

    config = read_config(heads_dir)
    fields = vllm_medusa_config(config)
    state = load_file(str(heads_dir / WEIGHTS_FILE))
    model, _ = load_target(model_dir)
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach()[: config.vocab_size].to(torch.float32).contiguous()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
