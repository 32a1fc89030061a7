"""Hydra++'s prefix-attention layer: one causal decoder block over the target's hidden states.

Plain Hydra heads see only ``h_p``, the target's final-norm hidden state at position ``p``.
With ``prefix_attention`` one extra pre-norm decoder block runs over the whole sequence
``h_0..h_p`` and its output ``z_p`` replaces ``h_p`` as the heads' input::

    a   = h + O(Attn_causal(RoPE(Q n(h)), RoPE(K n(h)), V n(h)))     n = RMSNorm
    z   = a + Down(SiLU(Gate n2(a)) * Up n2(a))                       (SwiGLU MLP, 2d wide)

``O`` and ``Down`` start at zero, so an untrained block is the identity (``z = h``) and a
checkpoint trained with it starts exactly where plain Hydra starts. Positions are absolute
(RoPE on the position index), heads ``d / num_heads`` wide.

Training runs :meth:`PrefixAttention.forward` over stored sequences ``[B, T, d]`` with a causal
mask. Inference runs :meth:`PrefixAttention.extend` over the newly committed positions of one
request, reading and extending that request's cached keys and values (RoPE already applied);
both compute the same ``z`` (``tests/unit/test_heads_prefix.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MLP_RATIO = 2
ROPE_BASE = 10000.0


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` (``w`` ones at init)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [..., T, heads, hd]`` at integer ``positions [T]`` (half-split).

    >>> x = torch.ones(1, 2, 1, 4)
    >>> torch.allclose(rope(x, torch.tensor([0, 1]))[0, 0], x[0, 0])  # position 0: unrotated
    True
    """
    hd = x.shape[-1]
    inv = ROPE_BASE ** (-torch.arange(0, hd // 2, device=x.device, dtype=torch.float32) / (hd // 2))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class PrefixAttention(nn.Module):
    """One causal decoder block (RMSNorm, ``num_heads``-head attention with RoPE, SwiGLU MLP)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden size {hidden_size} must split into {num_heads} heads of even width")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        d = hidden_size
        self.norm = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.gate_up = nn.Linear(d, 2 * MLP_RATIO * d, bias=False)
        self.down = nn.Linear(MLP_RATIO * d, d, bias=False)
        nn.init.normal_(self.qkv.weight, std=d ** -0.5)
        nn.init.normal_(self.gate_up.weight, std=d ** -0.5)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.down.weight)

    def _qkv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q, k, v [..., T, heads, hd]`` of ``h [..., T, d]`` (RoPE on ``q`` and ``k``)."""
        q, k, v = self.qkv(self.norm(h)).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        return rope(q, positions), rope(k, positions), v

    def _finish(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual attention output plus the MLP: ``attended [..., T, heads, hd] -> z [..., T, d]``."""
        a = h + self.out(attended.flatten(-2))
        gate, up = self.gate_up(self.mlp_norm(a)).chunk(2, dim=-1)
        return a + self.down(nn.functional.silu(gate) * up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``z [B, T, d]`` of ``h [B, T, d]`` (positions ``0..T-1``, causal): training's path."""
        positions = torch.arange(h.shape[-2], device=h.device)
        q, k, v = self._qkv(h, positions)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), is_causal=True)
        return self._finish(h, attended.transpose(-3, -2))

    def extend(self, h_new: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference's path for one request: ``(z [n, d], keys', values')``.

        ``h_new [n, d]`` are the hidden states at ``positions [n]`` (consecutive, after every
        position already cached); ``keys``/``values [L, heads, hd]`` the cached ones (``L``
        may be 0). Returns the new positions' ``z`` and the caches with them appended.

        >>> layer = PrefixAttention(8, 2)
        >>> empty = torch.zeros(0, 2, 4)
        >>> z, k, v = layer.extend(torch.randn(3, 8), torch.arange(3), empty, empty)
        >>> z.shape, k.shape
        (torch.Size([3, 8]), torch.Size([3, 2, 4]))
        """
        q, k, v = self._qkv(h_new, positions)
        keys, values = torch.cat([keys, k]), torch.cat([values, v])
        n, total = h_new.shape[0], keys.shape[0]
        # New query j sits at cache index total - n + j: it sees every cached key up to there.
        allowed = torch.arange(total, device=h_new.device)[None, :] <= (total - n + torch.arange(n, device=h_new.device))[:, None]
        scores = torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attended = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
        return self._finish(h_new, attended), keys, values
