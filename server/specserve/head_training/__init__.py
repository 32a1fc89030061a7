"""Draft heads for a target model: training (``specserve heads train``) and the demo model's defaults.

:func:`demo_heads_dir` returns heads trained for the demo model: the ones shipped in the package
(``artifact/<kind>``), then the user cache, and trains them (minutes on 2 cores) only when
neither matches the current demo model and head recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from specserve.head_training.recipe import HeadsRecipe

logger = logging.getLogger(__name__)

ARTIFACT_DIR = Path(__file__).parent / "artifact"


def _matches(directory: Path, recipe: HeadsRecipe, target_fingerprint: str | None) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("training", {}).get("fingerprint") == recipe.fingerprint()
            and config.get("target", {}).get("fingerprint") == target_fingerprint
            and (directory / "heads.safetensors").is_file())


def build(model_dir: Path, out_dirs: dict[str, Path], recipe: HeadsRecipe, corpus: Path | None = None,
          progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train one checkpoint per kind in ``out_dirs`` (``{"medusa": dir, ...}``) on shared data.

    The self-distillation data is generated once and reused for every kind, so Medusa and Hydra
    heads see the same sequences with the same budget. Returns each kind's training record.
    """
    from dataclasses import replace

    from specserve.head_training.data import demo_corpus, directory_corpus, distill, load_target
    from specserve.head_training.train import target_info, train_heads
    from specserve_vllm.heads.checkpoint import save_heads

    model, tokenizer = load_target(model_dir)
    texts_train = directory_corpus(corpus, heldout=False) if corpus else demo_corpus(heldout=False)
    texts_eval = directory_corpus(corpus, heldout=True) if corpus else demo_corpus(heldout=True)
    train = distill(model, tokenizer, texts_train, recipe.sequences, recipe.prompt_tokens, recipe.new_tokens,
                    recipe.seed, progress, desc="heads data (train)")
    heldout = distill(model, tokenizer, texts_eval, recipe.heldout_sequences, recipe.prompt_tokens,
                      recipe.new_tokens, recipe.seed + 1, progress, desc="heads data (held-out)")
    lm_head = model.get_output_embeddings().weight.detach()
    embed = model.get_input_embeddings().weight.detach()
    records = {}
    for kind, out in out_dirs.items():
        # Prefix attention is a Hydra option: Medusa heads trained alongside go without it.
        kind_recipe = replace(recipe, kind=kind,  # type: ignore[arg-type]
                              prefix_attention=recipe.prefix_attention and kind == "hydra")
        heads, config, record = train_heads(kind_recipe, train, heldout, lm_head, embed, progress)
        config = replace(config, target=target_info(model_dir))
        save_heads(out, config, heads)
        logger.info("heads saved", extra={"fields": {"kind": kind, "dir": str(out), **record["heldout"]}})
        records[kind] = record
    return records


def demo_heads_dir(kind: str, build_missing: bool = True, progress: bool = True) -> Path:
    """Heads of ``kind`` for the demo model (shipped, cached, or trained now into the cache)."""
    from specserve.demo import cache_root, demo_model_dir
    from specserve.demo.spec import DemoSpec

    target_fp = DemoSpec().fingerprint()
    recipe = HeadsRecipe(kind=kind)  # type: ignore[arg-type]
    cached = cache_root() / "heads" / target_fp / f"{kind}-{recipe.fingerprint()}"
    for candidate in (ARTIFACT_DIR / kind, cached):
        if _matches(candidate, recipe, target_fp):
            return candidate
    if not build_missing:
        raise FileNotFoundError(f"no {kind} heads for the demo model; run `specserve heads train --kind {kind}`")
    logger.info("training demo heads", extra={"fields": {"kind": kind, "dir": str(cached)}})
    build(demo_model_dir(progress=progress), {kind: cached}, recipe, progress=progress)
    return cached


def demo_vllm_medusa_dir() -> Path:
    """The demo model's Medusa heads converted for vLLM's own Medusa proposer (cached)."""
    from specserve.demo import cache_root, demo_model_dir
    from specserve.head_training.convert import convert_to_vllm_medusa

    source = demo_heads_dir("medusa")
    recipe_fp = json.loads((source / "config.json").read_text())["training"]["fingerprint"]
    out = cache_root() / "heads" / recipe_fp / "vllm-medusa"
    if not (out / "model.safetensors").is_file():
        convert_to_vllm_medusa(source, demo_model_dir(), out)
    return out


def resolve_heads(drafter: str, heads: str | None, is_demo: bool) -> str | None:
    """The checkpoint dir ``drafter`` runs with: ``heads`` if given, else the demo model's.

    ``None`` for drafters without heads; ``ValueError`` when a head drafter has no checkpoint.
    """
    if drafter not in ("medusa", "hydra", "vllm-medusa"):
        return None
    if heads:
        return str(Path(heads).resolve())
    if not is_demo:
        raise ValueError(f"--drafter {drafter} needs --heads DIR for a model other than the demo model "
                         "(train them with `specserve heads train`)")
    return str(demo_vllm_medusa_dir() if drafter == "vllm-medusa" else demo_heads_dir(drafter))
