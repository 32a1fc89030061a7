"""The head architectures in vLLM's ``ModelRegistry`` and their resolution by the proposer."""

from __future__ import annotations

from typing import Any

from specserve_vllm.heads.config import ARCHITECTURES, HeadsConfig

CLASS_PATHS: dict[str, str] = {
    ARCHITECTURES["medusa"]: "specserve_vllm.heads.model:MedusaHeads",
    ARCHITECTURES["hydra"]: "specserve_vllm.heads.model:HydraHeads",
}


def register() -> None:
    """Register the head architectures (lazily imported) with vLLM's ``ModelRegistry``."""
    from vllm import ModelRegistry

    for arch, path in CLASS_PATHS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, path)


def resolve_head_class(config: HeadsConfig, model_config: Any) -> type:
    """The module class vLLM's registry holds for ``config``'s architecture."""
    from vllm import ModelRegistry

    register()
    cls, _ = ModelRegistry.resolve_model_cls([config.architecture], model_config)
    return cls
