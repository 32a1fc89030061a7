"""Medusa and Hydra head modules (torch) and their greedy drafting.

Both read ``hidden`` = the target's last hidden state at position ``p`` (after its final norm;
the target samples token ``x[p+1]`` from it) and score with the target's LM head weight ``W``
(``[vocab, d]``). Head ``i`` (0-based) predicts ``x[p+2+i]``.

* Medusa head ``i``: ``z = ResBlocks_i(hidden)``, logits ``z @ W.T``; heads are independent.
* Hydra head ``i``: ``z = hidden + SiLU(P_i [hidden; E x[p+1]; ...; E x[p+1+i]])`` then
  ``num_layers - 1`` residual blocks; it sees the tokens drafted before it (sequential
  dependence), with ``E`` the target's input embedding.

With ``config.prefix_attention`` Hydra heads own a ``prefix`` block
(:class:`~specserve_vllm.heads.prefix.PrefixAttention`) and ``hidden`` above is its output
``z_p`` over ``h_0..h_p`` rather than ``h_p``: :meth:`HydraHeads.head_inputs` computes it for
whole sequences (training), the proposer incrementally per request (inference).

Every projection starts at zero, so an untrained head predicts what the target predicts for
the next token; training moves it to the token ``i + 1`` further.

Drafting takes each row's own draft length (``lengths``): head ``i`` and the LM head run only
for the rows that draft position ``i``, so a plan with a few deep rows costs their drafts, not
every row at the deepest row's depth (the LM head is most of a head's cost).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specserve_vllm.heads.config import HeadsConfig
from specserve_vllm.heads.prefix import PrefixAttention


def ragged(lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """Rows ordered by draft length, longest first (ties in row order), and how many of them
    draft each position ``0 .. k - 1``: the rows drafting position ``i`` are the first
    ``active[i]`` of that order, so each position slices a prefix.

    >>> order, active = ragged(torch.tensor([1, 3, 0, 2]), 3)
    >>> order.tolist(), active
    ([1, 3, 0, 2], [3, 2, 1])
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    ordered = lengths[order]
    return order, [int((ordered > i).sum()) for i in range(k)]


def unordered(drafts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``drafts`` (rows in ``order``) back in the rows' own order.

    >>> unordered(torch.tensor([[5], [6], [7]]), torch.tensor([2, 0, 1])).tolist()
    [[6], [7], [5]]
    """
    out = torch.empty_like(drafts)
    out[order] = drafts
    return out


class ResidualStack(nn.Module):
    """``num_layers`` blocks ``x <- x + SiLU(A x + b)`` (``A``, ``b`` zero at init)."""

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=True) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """Independent heads: ``forward(hidden [n, d]) -> [n, num_heads, d]``."""

    kind = "medusa"

    def __init__(self, config: HeadsConfig, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            ResidualStack(config.hidden_size, config.num_layers) for _ in range(config.num_heads)
        )

    prefix = None

    def head_inputs(self, sequences: torch.Tensor) -> torch.Tensor:
        """The heads' input at every position of ``sequences [B, T, d]``: the states themselves."""
        return sequences

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack([block(hidden) for block in self.blocks], dim=1)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, first_token: torch.Tensor, lm_head: torch.Tensor,
              embed: torch.Tensor, k: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy drafts ``[n, k]`` (``k <= num_heads``) from ``hidden [n, d]``; with
        ``lengths``, row ``r`` is drafted to ``lengths[r]`` only (-1 beyond)."""
        if lengths is None or int(lengths.min()) >= k:  # one batched product: about 2x the loop's speed
            states = torch.stack([block(hidden) for block in self.blocks[:k]], dim=1)  # [n, k, d]
            return (states @ lm_head.T).argmax(dim=-1)
        order, active = ragged(lengths, k)
        hidden = hidden[order]
        out = torch.full((hidden.shape[0], k), -1, dtype=torch.long, device=hidden.device)
        for i, m in enumerate(active):
            if m:
                out[:m, i] = (self.blocks[i](hidden[:m]) @ lm_head.T).argmax(dim=-1)
        return unordered(out, order)


class HydraHeads(nn.Module):
    """Sequentially dependent heads.

    ``forward(hidden [n, d], token_embeds [n, num_heads, d]) -> [n, num_heads, d]`` with
    ``token_embeds[:, j] = E x[p+1+j]`` (teacher forcing, for training).
    """

    kind = "hydra"

    def __init__(self, config: HeadsConfig, **_: Any) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.proj = nn.ModuleList(nn.Linear((i + 2) * d, d, bias=True) for i in range(config.num_heads))
        for layer in self.proj:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.blocks = nn.ModuleList(
            ResidualStack(d, config.num_layers - 1) for _ in range(config.num_heads)
        )
        self.prefix = PrefixAttention(d, config.prefix_heads) if config.prefix_attention else None

    def head_inputs(self, sequences: torch.Tensor) -> torch.Tensor:
        """The heads' input at every position of ``sequences [B, T, d]`` (target hidden states).

        ``z [B, T, d]`` of the causal prefix block, or the hidden states themselves without one.
        """
        return sequences if self.prefix is None else self.prefix(sequences)

    def head(self, i: int, hidden: torch.Tensor, prev_embeds: list[torch.Tensor]) -> torch.Tensor:
        """State of head ``i`` given the embeddings of the ``i + 1`` tokens before its target."""
        z = hidden + nn.functional.silu(self.proj[i](torch.cat([hidden, *prev_embeds], dim=-1)))
        return self.blocks[i](z)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if token_embeds is None:
            raise ValueError("Hydra heads need the embeddings of the tokens before each head's target")
        prev = [token_embeds[:, j] for j in range(self.config.num_heads)]
        return torch.stack([self.head(i, hidden, prev[: i + 1]) for i in range(self.config.num_heads)], dim=1)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, first_token: torch.Tensor, lm_head: torch.Tensor,
              embed: torch.Tensor, k: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy drafts ``[n, k]``: head ``i`` reads the sampled token and drafts ``0..i-1``;
        with ``lengths``, row ``r`` is drafted to ``lengths[r]`` only (-1 beyond)."""
        if lengths is None or int(lengths.min()) >= k:  # no reordering or slicing: 5-10% faster
            prev = [embed[first_token]]
            out = []
            for i in range(k):
                token = (self.head(i, hidden, prev) @ lm_head.T).argmax(dim=-1)
                out.append(token)
                prev.append(embed[token])
            return torch.stack(out, dim=1)
        order, active = ragged(lengths, k)
        hidden, first_token = hidden[order], first_token[order]
        drafts = torch.full((hidden.shape[0], k), -1, dtype=torch.long, device=hidden.device)
        prev = [embed[first_token]]
        for i, m in enumerate(active):  # the rows drafting position i: a prefix, shrinking
            if not m:
                break
            token = (self.head(i, hidden[:m], [p[:m] for p in prev]) @ lm_head.T).argmax(dim=-1)
            drafts[:m, i] = token
            prev.append(embed[token])
        return unordered(drafts, order)


HEAD_CLASSES: dict[str, type[nn.Module]] = {"medusa": MedusaHeads, "hydra": HydraHeads}


def build_heads(config: HeadsConfig) -> nn.Module:
    """Freshly initialised heads for ``config``.

    >>> from specserve_vllm.heads.config import HeadsConfig
    >>> heads = build_heads(HeadsConfig(kind="hydra", num_heads=3, hidden_size=8, vocab_size=16))
    >>> heads(torch.zeros(2, 8), torch.zeros(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """
    return HEAD_CLASSES[config.kind](config)
