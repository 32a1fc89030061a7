"""Save and load head checkpoints (``config.json`` + ``heads.safetensors``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from specserve_vllm.heads.config import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, HeadsConfig, read_config
from specserve_vllm.heads.model import build_heads


def save_heads(directory: str | Path, config: HeadsConfig, heads: nn.Module) -> Path:
    """Write ``heads`` with ``config`` into ``directory`` atomically (via a sibling temp dir)."""
    from safetensors.torch import save_file

    out = Path(directory)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_heads(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               head_class: type | None = None) -> tuple[HeadsConfig, nn.Module]:
    """``(config, heads in eval mode)`` from ``directory``; :class:`CheckpointError` if unusable.

    ``head_class`` overrides the module class (the proposer passes the one vLLM's registry holds).
    """
    from safetensors.torch import load_file

    config = read_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in head checkpoint {directory}")
    heads = head_class(config) if head_class is not None else build_heads(config)
    state = load_file(str(path))
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not match its config: {exc}") from exc
    return config, heads.to(device=device, dtype=dtype).eval()
