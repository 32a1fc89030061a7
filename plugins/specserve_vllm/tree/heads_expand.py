"""Expanders for Medusa and Hydra heads: their top-k next tokens along any draft path.

Medusa's heads ignore the path (head ``d`` always proposes the same top-k for depth ``d``), so
one pass scores every head. Hydra's head ``d`` reads the embeddings of the sampled token and
the path's ``d`` tokens, so each expansion runs head ``d`` on a batch of paths of length ``d``
(one forward per tree level in :func:`~specserve_vllm.tree.build.static_tree`). Greedy
descent through either expander reproduces the heads' chain draft (``heads.draft``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from specserve_vllm.tree.build import Candidates, Expander, Path, medusa_expander


@torch.no_grad()
def heads_expander(heads: nn.Module, hidden: torch.Tensor, first_token: int, lm_head: torch.Tensor,
                   embed: torch.Tensor, k: int) -> Expander:
    """One request's expander; ``hidden [d]`` is the heads' input, ``first_token`` the root."""
    num_heads = int(heads.config.num_heads)
    if heads.kind == "medusa":
        states = torch.stack([block(hidden[None])[0] for block in heads.blocks], dim=0)  # [H, d]
        logp = torch.log_softmax((states @ lm_head.T).float(), dim=-1)  # [H, vocab]
        top = logp.topk(k, dim=-1)
        return medusa_expander(top.indices.numpy(), top.values.double().numpy())

    root = embed[torch.tensor([first_token])]  # [1, d]

    @torch.no_grad()
    def expand(paths: Sequence[Path]) -> list[Candidates]:
        out: list[Candidates] = [[] for _ in paths]
        by_len: dict[int, list[int]] = {}
        for j, p in enumerate(paths):
            if len(p) < num_heads:
                by_len.setdefault(len(p), []).append(j)
        for depth, rows in by_len.items():
            toks = torch.tensor([paths[j] for j in rows], dtype=torch.long).reshape(len(rows), depth)
            prev = [root.expand(len(rows), -1), *(embed[toks[:, i]] for i in range(depth))]
            state = heads.head(depth, hidden[None].expand(len(rows), -1), prev)  # [n, d]
            logp = torch.log_softmax((state @ lm_head.T).float(), dim=-1)
            top = logp.topk(k, dim=-1)
            for j, ids, lps in zip(rows, top.indices.tolist(), top.values.tolist()):
                out[j] = list(zip(ids, lps))
        return out

    return expand
