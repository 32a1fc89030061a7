"""The head checkpoint's ``config.json``: what was trained, for which target, how well.

Pure (no torch), so the gateway and the CLI can read checkpoints cheaply.

    >>> c = HeadsConfig(kind="hydra", num_heads=4, hidden_size=256, vocab_size=4096)
    >>> c.architecture
    'SpecserveHydraHeads'
    >>> HeadsConfig.from_dict(c.to_dict()) == c
    True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

HeadKind = Literal["medusa", "hydra"]
KINDS: tuple[str, ...] = ("medusa", "hydra")
FORMAT = "specserve-heads"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "heads.safetensors"
ARCHITECTURES: dict[str, str] = {"medusa": "SpecserveMedusaHeads", "hydra": "SpecserveHydraHeads"}


class CheckpointError(ValueError):
    """A head checkpoint that cannot be used (missing files, wrong format, wrong target)."""


@dataclass(frozen=True)
class HeadsConfig:
    """Shape and provenance of a set of draft heads.

    ``num_heads`` heads; head ``i`` (0-based) predicts the token ``i + 1`` positions after the
    one the target samples from the same hidden state. ``num_layers`` residual blocks per head.
    Hydra head ``i`` also reads the embeddings of the ``i + 1`` tokens before its own
    (the sampled token and the drafts of heads ``0..i-1``).

    ``prefix_attention`` (Hydra only): the heads read ``z_p`` of one causal decoder block
    (``prefix_heads`` attention heads) over the target's hidden states ``h_0..h_p`` instead
    of ``h_p`` (Hydra++; :mod:`specserve_vllm.heads.prefix`).
    """

    kind: HeadKind
    num_heads: int
    hidden_size: int
    vocab_size: int
    num_layers: int = 1
    target: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    heldout_top1: list[float] = field(default_factory=list)
    prefix_attention: bool = False
    prefix_heads: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown head kind {self.kind!r}; expected one of {KINDS}")
        if self.prefix_attention and self.kind != "hydra":
            raise CheckpointError(f"prefix attention is a Hydra option, not one of {self.kind} heads")
        for name in ("num_heads", "hidden_size", "vocab_size", "num_layers", "prefix_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"{name} must be a positive integer, got {value!r}")

    @property
    def architecture(self) -> str:
        """The vLLM ``ModelRegistry`` architecture name of these heads."""
        return ARCHITECTURES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architectures": [self.architecture], **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadsConfig":
        if data.get("format") not in (None, FORMAT):
            raise CheckpointError(f"not a {FORMAT} checkpoint (format={data.get('format')!r})")
        if int(data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format_version {data['format_version']} is newer than {FORMAT_VERSION}")
        names = {f.name for f in fields(cls)}
        missing = {"kind", "num_heads", "hidden_size", "vocab_size"} - data.keys()
        if missing:
            raise CheckpointError(f"head config lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_config(directory: str | Path) -> HeadsConfig:
    """The :class:`HeadsConfig` of the checkpoint in ``directory``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in head checkpoint {directory}")
    try:
        return HeadsConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"bad {path}: {exc}") from exc
