"""Per-request keys and values of the prefix-attention block inside vLLM (inference path).

The hidden feed (:mod:`specserve_vllm.compat.hidden_feed`) hands the proposer, each step, the
target's hidden states of every position of each request that became *committed* in that
step; :meth:`PrefixCache.commit` runs :meth:`PrefixAttention.extend` over them, appends their
keys/values to the request's cache and keeps the last ``z``, the heads' input for the next
draft.

Alignment (the same as training's, :func:`specserve.head_training.train.gather`): the target's hidden
state ``h_q`` at position ``q`` is its state *after reading token* ``x[q]``, from which it
samples ``x[q+1]``. Worked example, prompt ``x0 x1 x2 x3``, ``k = 2`` drafts:

* prefill (maybe in chunks) schedules positions 0..3: rows ``h0..h3`` are all committed and
  cached; the target samples ``x4`` from ``h3``; the heads draft from ``z3 = block(h0..h3)``
  with ``x4`` as Hydra's first token: ``d5, d6``. In training, position ``p = 3`` is the
  sample with input ``z_3`` over ``h_0..h_3``, head 0 labelled ``x5``.
* decode schedules ``x4 d5 d6`` at positions 4, 5, 6 (rows ``h4 h5 h6``). Say ``d5`` is
  accepted and ``d6`` rejected: the target samples ``x5 = d5`` from ``h4`` and ``x6`` from
  ``h5``. Committed are the positions whose *input* tokens are now part of the sequence, 4
  (``x4``) and 5 (``d5``): rows ``h4, h5`` are cached, ``h6`` (computed on the rejected
  ``d6``) is not. The next draft starts from ``z5`` with first token ``x6``. The count of
  committed rows in a decode block is the number of sampled tokens.

Positions that never pass through the target in this process (a vLLM prefix-cache hit skips
the cached prompt blocks) are copied from a live or recently finished request with the same
leading tokens (keys/values depend only on those tokens); failing that, the request attends
to the positions it has (drafts may be worse, outputs stay exact: the target verifies them).
Requests in ``finished`` are freed from the live set; the most recent ones (up to
``retain_bytes``) stay as such donors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from specserve_vllm.heads.prefix import PrefixAttention

logger = logging.getLogger(__name__)

RETAIN_BYTES = 32 << 20
"""Default bound on the keys/values kept for finished requests (prefix-cache donors)."""


@dataclass
class Entry:
    """One request's cache: ``keys``/``values [L, heads, hd]`` at ``positions [L]``."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    last_z: torch.Tensor | None = None

    @property
    def next_position(self) -> int:
        return int(self.positions[-1]) + 1 if self.positions.numel() else 0

    @property
    def contiguous(self) -> bool:
        """Whether the cache holds exactly positions ``0..L-1``."""
        return self.positions.numel() == self.next_position

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.tokens.nbytes

    def truncate(self, length: int) -> None:
        """Keep positions ``< length`` (a recomputed request, e.g. after preemption)."""
        keep = self.positions < length
        self.keys, self.values, self.positions = self.keys[keep], self.values[keep], self.positions[keep]
        self.tokens = self.tokens[:length]


class PrefixCache:
    """Prefix-attention keys/values per request id, fed by committed positions."""

    def __init__(self, layer: PrefixAttention, retain_bytes: int = RETAIN_BYTES) -> None:
        self.layer = layer
        self.retain_bytes = retain_bytes
        self.live: dict[str, Entry] = {}
        self.retired: OrderedDict[str, Entry] = OrderedDict()
        self.stats = {"copied_positions": 0, "missing_positions": 0, "rewinds": 0}

    def _empty(self, like: torch.Tensor) -> Entry:
        shape = (0, self.layer.num_heads, self.layer.head_dim)
        return Entry(keys=like.new_zeros(shape), values=like.new_zeros(shape),
                     positions=torch.zeros(0, dtype=torch.long, device=like.device))

    def _donor(self, tokens: np.ndarray, length: int, like: torch.Tensor) -> Entry:
        """A fresh entry with positions ``0..length-1`` copied from a request sharing those tokens."""
        entry = self._empty(like)
        for donor in [*self.live.values(), *reversed(self.retired.values())]:
            if (donor.contiguous and donor.next_position >= length and donor.tokens.shape[0] >= length
                    and np.array_equal(donor.tokens[:length], tokens[:length])):
                entry.keys, entry.values = donor.keys[:length].clone(), donor.values[:length].clone()
                entry.positions, entry.tokens = donor.positions[:length].clone(), tokens[:length].copy()
                self.stats["copied_positions"] += length
                return entry
        self.stats["missing_positions"] += length
        logger.debug("prefix attention: no cached keys for %d leading positions", length)
        return entry

    @torch.no_grad()
    def commit(self, req_id: str, start: int, hidden: torch.Tensor, tokens: np.ndarray) -> None:
        """Cache positions ``start..start+n-1`` of ``req_id`` from their hidden states ``[n, d]``.

        ``tokens`` holds the request's token ids at positions ``0..start+n-1`` at least.
        """
        if hidden.shape[0] == 0:
            return
        weight = self.layer.qkv.weight
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        entry = self.live.get(req_id)
        if entry is None:
            entry = self.retired.pop(req_id, None) or self._empty(hidden)
        if start < entry.next_position:
            entry.truncate(start)
            self.stats["rewinds"] += 1
        if entry.positions.numel() == 0 and start > 0:
            entry = self._donor(tokens, start, hidden)
        positions = torch.arange(start, start + hidden.shape[0], device=hidden.device)
        z, entry.keys, entry.values = self.layer.extend(hidden, positions, entry.keys, entry.values)
        entry.positions = torch.cat([entry.positions, positions])
        entry.tokens = np.asarray(tokens[: start + hidden.shape[0]], dtype=np.int64).copy()
        entry.last_z = z[-1]
        self.live[req_id] = entry

    def head_input(self, req_id: str) -> torch.Tensor | None:
        """``z`` at the request's last committed position (the heads' input), if any."""
        entry = self.live.get(req_id)
        return None if entry is None else entry.last_z

    def finish(self, req_ids: set[str] | frozenset[str]) -> None:
        """Free finished requests (keeping the newest as donors, within ``retain_bytes``)."""
        for req_id in req_ids:
            entry = self.live.pop(req_id, None)
            if entry is not None and self.retain_bytes > 0:
                entry.last_z = None
                self.retired[req_id] = entry
        total = sum(e.nbytes() for e in self.retired.values())
        while self.retired and total > self.retain_bytes:
            _, oldest = self.retired.popitem(last=False)
            total -= oldest.nbytes()
