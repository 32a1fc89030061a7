"""Chain steps verified by a walk over the target's own tokens instead of vLLM's rejection sampler.

A chain is a tree without branches, so the walk that verifies trees
(:mod:`specserve_vllm.tree.verify`) verifies it too: take the target's token at each logits row
(its argmax at temperature 0, one draw from its sampling law otherwise), accept drafts while
they equal those tokens, emit the first token that differs (or the bonus at the chain's end).
For drafts without probabilities (every specserve drafter) this is exactly the law vLLM's
rejection sampler gives (a draft is accepted with the target's probability of it, and a
rejection emits a draw from the target without it), for less work: one argmax, or one
inverse-CDF draw (one uniform), per row, where vLLM's sampler draws noise over the vocabulary
for a recovered token at every row and again for the bonus (``docs/speculation-control.md``).

A step walks when every request could verify a tree (:func:`~specserve_vllm.tree.step.tree_eligible`:
temperature, top-k and top-p only), none asks for logprobs, no thinking budget is tracked, the
engine has only vLLM's built-in logits processors, schedules synchronously, and the drafter
handed no draft probabilities; otherwise vLLM's rejection sampler runs as before. The engine
setting ``chain_verify`` (``--additional-config '{"specserve": {"chain_verify": "rejection"}}'``)
keeps vLLM's sampler for every step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from specserve_vllm.compat.upstream import UpstreamFunction

logger = logging.getLogger(__name__)

ENABLED_ATTR = "_specserve_chain_walk"
"""Runner attribute: whether this engine walks chains (its setting and scheduling, read once)."""

UPSTREAM: tuple[UpstreamFunction, ...] = (
    # Relied on: the law a sampled row follows (temperature with greedy rows at 1, then the
    # argmax-invariant processors, then top-k/top-p), and greedy rows take the argmax.
    UpstreamFunction("vllm.v1.sample.sampler", "Sampler.sample",
                     "9d8f0d0456c2735008b946dd08d0d8c47b26d1e36f318fa9ab5a243d7815c40e"),
    # Relied on: a sampled row's law is the softmax of its logits after the top-k/top-p masks
    # (drawn there by a Gumbel argmax, here by the inverse CDF: the same law).
    UpstreamFunction("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler.forward_cpu",
                     "ee68a2e5e279814dc11905a1c14bb930e0f36e83450c094fa675eb316ebeb3c5"),
    # Relied on: what the rejection sampler adds to the target rows (penalties, allowed and bad
    # words, min-tokens, a thinking budget) is what a walking step rules out.
    UpstreamFunction("vllm.v1.sample.rejection_sampler", "RejectionSampler.apply_logits_processors",
                     "1ea3bda3ddc456785d2575059f683765595f19598ba377c198a22abef361dc83"),
)


def builtin_processors_only(logitsprocs: Any) -> bool:
    """Whether the engine's logits processors are vLLM's built-in ones (min-p, logit bias,
    min tokens), whose requests :func:`~specserve_vllm.tree.step.tree_eligible` rules out: a
    custom processor could change any request's law, so those engines keep vLLM's samplers."""
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )

    builtin = (MinPLogitsProcessor, LogitBiasLogitsProcessor, MinTokensLogitsProcessor)
    return all(type(p) in builtin for p in logitsprocs.all)


BUILTIN_ATTR = "_specserve_builtin_logitsprocs"
"""Runner attribute: whether the engine has only vLLM's built-in logits processors (read once)."""


def plain_law(runner: Any) -> bool:
    """Whether, engine-wide, this step's tree-eligible requests sample from temperature, top-k
    and top-p alone: only vLLM's built-in logits processors (checked once per runner) and no
    thinking budget tracked. Tree steps and walked chains both need it."""
    builtin = getattr(runner, BUILTIN_ATTR, None)
    if builtin is None:
        builtin = builtin_processors_only(runner.input_batch.sampling_metadata.logitsprocs)
        setattr(runner, BUILTIN_ATTR, builtin)
        if not builtin:
            logger.warning("custom logits processors: drafts are verified by vLLM's rejection sampler, as chains")
    holder = getattr(runner.input_batch.sampling_metadata, "thinking_budget_state_holder", None)
    return builtin and not (holder is not None and holder.has_tracked_requests())


def enabled(runner: Any) -> bool:
    """Whether this engine walks chains: its ``chain_verify`` setting, and synchronous
    scheduling (read once per runner)."""
    found = getattr(runner, ENABLED_ATTR, None)
    if found is None:
        from specserve_vllm.spec_control.planner import settings_from

        setting = settings_from(getattr(runner.vllm_config, "additional_config", None)).chain_verify
        found = setting == "walk" and not runner.use_async_scheduling
        setattr(runner, ENABLED_ATTR, found)
        logger.info("chain verification", extra={"fields": {"setting": setting, "walk": found}})
    return bool(found)


def walkable(runner: Any) -> bool:
    """Whether this step's chains may be walked (see the module docstring)."""
    from specserve_vllm.tree.step import tree_eligible

    if not enabled(runner) or not plain_law(runner):
        return False
    metadata = runner.input_batch.sampling_metadata
    if metadata.max_num_logprobs is not None or metadata.logprob_token_ids:
        return False
    requests = runner.requests
    return all(tree_eligible(requests[r].sampling_params)
               for r in runner.input_batch.req_ids[: runner.input_batch.num_reqs])


def row_tokens(logits: Any, num_draft_tokens: list[int], metadata: Any) -> np.ndarray:
    """``[sum(n + 1)]`` the target's token at each logits row: the argmax for greedy requests,
    one draw from the law vLLM samples from (temperature, top-k, top-p) for the others, their
    rows' uniforms drawn from the request's generator when it has one."""
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from specserve_vllm.tree.step import GREEDY_EPS

    counts = np.asarray(num_draft_tokens, dtype=np.int64) + 1
    rows = logits[: int(counts.sum())]
    if metadata.all_greedy:
        return rows.float().numpy().argmax(axis=-1)
    temperature = metadata.temperature.numpy()
    owner = np.repeat(np.arange(len(counts)), counts)  # request index of each row
    greedy = temperature[owner] < GREEDY_EPS
    tokens = np.empty(len(owner), dtype=np.int64)
    if greedy.any():
        tokens[greedy] = rows[torch.from_numpy(greedy)].float().numpy().argmax(axis=-1)
    sampled = np.flatnonzero(~greedy)
    divisor = torch.from_numpy(temperature[owner[sampled]]).unsqueeze(1)
    if sampled.size == len(owner):  # every row sampled: no gather (the division makes the copy)
        scaled = rows.float() / divisor
    else:
        scaled = rows[torch.from_numpy(sampled)].float().div_(divisor)
    per_row = torch.from_numpy(owner[sampled])
    top_k = None if metadata.top_k is None else metadata.top_k[per_row]
    top_p = None if metadata.top_p is None else metadata.top_p[per_row]
    scaled = apply_top_k_top_p(scaled, top_k, top_p)
    uniforms = torch.rand(len(sampled), dtype=torch.float64)
    for req_index, generator in metadata.generators.items():
        mine = np.flatnonzero(owner[sampled] == req_index)
        if mine.size:
            uniforms[torch.from_numpy(mine)] = torch.rand(mine.size, generator=generator, dtype=torch.float64)
    tokens[sampled] = inverse_cdf_draws(scaled, uniforms)
    return tokens


def inverse_cdf_draws(logits: Any, uniforms: Any) -> np.ndarray:
    """One draw per row of ``softmax(logits)`` from one uniform in [0, 1) per row: the first
    token whose cumulative probability (summed in float64) exceeds ``u * total``. Masked tokens (``-inf``)
    have no width, so they are never drawn. One random number per row, where Gumbel or
    exponential noise needs one per vocabulary entry (most of a sampled step's cost on CPU).

    >>> import torch
    >>> inverse_cdf_draws(torch.log(torch.tensor([[0.25, 0.0, 0.75], [0.5, 0.5, 0.0]])),
    ...                   torch.tensor([0.2, 0.6], dtype=torch.float64)).tolist()
    [0, 1]
    """
    import torch

    cdf = logits.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)  # vLLM's float32 law, summed in float64
    points = (uniforms * cdf[:, -1]).unsqueeze(1)
    found = torch.searchsorted(cdf, points, right=True).squeeze(1)
    over = found >= cdf.shape[1]  # u * total rounding up to total (about 2**-53 a draw)
    if bool(over.any()):
        found[over] = logits[over].argmax(dim=-1)
    return found.numpy()


def walk_sampler(real: Any, on_walk: Any) -> Any:
    """A stand-in for the runner's ``rejection_sampler`` for one step: walks the chains (vLLM's
    output layout, no logprobs) unless the drafter handed draft probabilities, then calls
    ``on_walk()``."""

    def sample(metadata: Any, draft_probs: Any, logits: Any, sampling_metadata: Any) -> Any:
        import torch
        from vllm.v1.outputs import SamplerOutput

        from specserve_vllm.tree.verify import chain_outputs

        if draft_probs is not None:
            return real(metadata, draft_probs, logits, sampling_metadata)
        counts = list(metadata.num_draft_tokens)
        tokens = row_tokens(logits, counts, sampling_metadata)
        out = chain_outputs(metadata.draft_token_ids.numpy(), counts, tokens, metadata.max_spec_len + 1)
        on_walk()
        return SamplerOutput(sampled_token_ids=torch.from_numpy(out), logprobs_tensors=None)

    return sample


def apply() -> None:
    """Nothing to install: :mod:`specserve_vllm.compat.tree_steps`'s ``_sample`` wrap (the
    outermost) swaps the sampler in on steps without trees."""
