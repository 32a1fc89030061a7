"""Logits rows kept in order for one batched argmax: a chain matrix's learning, deferred.

A one-column recycling matrix learns each position's best next token. Taking it every step
costs half a dozen small tensor and array operations right after the forward pass, where each
is several times its warm price; keeping the rows in a preallocated buffer costs one copy, and
one argmax over many steps' rows is then paid when the drafter next drafts or the buffer fills.

    >>> import torch
    >>> b = ArgmaxBacklog(max_rows=4)
    >>> b.add(np.array([7, 8]), torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]]))
    True
    >>> b.add(np.array([9]), torch.tensor([[0.0, 0.0, 3.0]])), len(b), b.room
    (True, 3, 1)
    >>> tokens, best = b.take()
    >>> tokens.tolist(), best[:, 0].tolist(), len(b)
    ([7, 8, 9], [1, 0, 2], 0)

Rows of steps that drafted nothing may come with their requests (:class:`.HindsightRows`):
:meth:`ArgmaxBacklog.take_hindsight` then also scores the chain draft each would have had
(:mod:`.hindsight`), before the rows are learnt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specserve_vllm.drafters.hindsight import (
    GREEDY_BELOW,
    HindsightRows,
    acceptance_probability,
    drafts_before,
    scored_rows,
)

SAMPLED_ROWS = 16
"""Sampled rows scored per take at most (each costs a softmax over the vocabulary; greedy rows
cost a comparison and are all scored)."""


class ArgmaxBacklog:
    """Up to ``max_rows`` logits rows (CPU) with their input tokens, in the order added."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._rows: Any = None  # [max_rows, vocab] tensor, allocated at the first add
        self._layout: tuple[int, Any] | None = None  # the buffer's (vocab, dtype)
        self._tokens = np.zeros(max_rows, dtype=np.int64)
        self._steps = np.zeros(max_rows, dtype=np.int64)
        """Each row's step (the value of :attr:`steps` when it was added)."""
        self._temperatures = np.full(max_rows, np.nan)
        """Each row's temperature when it came with :class:`.HindsightRows` (NaN: no evidence)."""
        self._req_ids: list[str] = []
        """Each row's request (``""`` for rows without :class:`.HindsightRows`)."""
        self._hindsight = 0
        """Rows kept with a finite temperature."""
        self._filled = 0
        self.steps = 0
        """Calls to :meth:`add` since the last :meth:`take`."""

    def __len__(self) -> int:
        return self._filled

    @property
    def room(self) -> int:
        """Rows that still fit."""
        return self.max_rows - self._filled

    def add(self, tokens: Any, logits: Any, rows: HindsightRows | None = None) -> bool:
        """Keep a copy of ``logits`` (``[n, vocab]``) after ``tokens`` (``[n]``); False, keeping
        nothing, when they do not fit: more rows than :attr:`room`, another width or dtype than
        the kept rows' (:meth:`take` them first), off the CPU, or more rows than the buffer.
        ``rows``: the requests of a step that drafted nothing (``n`` of them), for hindsight.
        This runs every step right after the forward pass, so it makes few calls."""
        shape = logits.shape
        n = shape[0]
        if len(shape) != 2 or (shape[1], logits.dtype) != self._layout or n > self.max_rows - self._filled:
            if self._filled or not self._allocate(logits):
                return False
        start = self._filled
        self._rows[start:start + n].copy_(logits)
        self._tokens[start:start + n] = tokens
        self._steps[start:start + n] = self.steps
        if rows is not None and len(rows.req_ids) == n:
            if len(self._req_ids) < start:
                self._req_ids += [""] * (start - len(self._req_ids))
            del self._req_ids[start:]
            self._req_ids += rows.req_ids
            self._temperatures[start:start + n] = rows.temperatures
            self._hindsight += n
        self._filled = start + n
        self.steps += 1
        return True

    def _allocate(self, logits: Any) -> bool:
        """Make the buffer fit ``logits``' width and dtype (empty backlog only); False when
        they cannot be kept at all."""
        if logits.device.type != "cpu" or logits.dim() != 2 or logits.shape[0] > self.max_rows:
            return False
        layout = (int(logits.shape[1]), logits.dtype)
        if layout != self._layout:
            import torch

            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                self._rows = torch.empty((self.max_rows, layout[0]), dtype=layout[1])
            self._layout = layout
        return True

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [m], best ids [m, 1])`` of every kept row, in order; the backlog is empty after."""
        tokens, best, _ = self.take_hindsight(None)
        return tokens, best

    def take_hindsight(self, column: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                  tuple[list[str], np.ndarray, np.ndarray] | None]:
        """:meth:`take`, plus ``(req_ids, temperatures, acceptance probability)`` of the rows that
        came with :class:`.HindsightRows` (None when none did, or ``column`` is None): each
        scored against the draft the one-column matrix ``column`` (``[vocab]``, as it is before
        these rows are learnt) and the rows before it gave its token."""
        m, self._filled, self.steps = self._filled, 0, 0
        if not m:
            self._hindsight = 0
            return np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.int64), None
        tokens, best = self._tokens[:m].copy(), best_candidates(self._rows[:m])
        found = None
        if self._hindsight:
            temps = self._temperatures[:m].copy()
            rows = scored_rows(temps, SAMPLED_ROWS)
            if len(rows) and column is not None:
                drafts = drafts_before(tokens, best[:, 0], column, self._steps[:m])[rows]
                t = temps[rows]
                p = np.full(len(rows), np.nan)
                greedy = np.flatnonzero((t < GREEDY_BELOW) & (drafts >= 0))
                p[greedy] = best[rows[greedy], 0] == drafts[greedy]  # the argmax taken above
                sampled = np.flatnonzero(t >= GREEDY_BELOW)
                if len(sampled):
                    p[sampled] = acceptance_probability(_numpy_rows(self._rows, rows[sampled]), drafts[sampled],
                                                        t[sampled])
                ids = self._req_ids + [""] * (m - len(self._req_ids))
                found = ([ids[i] for i in rows.tolist()], t, p)
            self._temperatures[:m] = np.nan
            self._hindsight = 0
            self._req_ids.clear()
        return tokens, best, found


def _numpy_rows(rows: Any, index: np.ndarray) -> np.ndarray:
    """``rows[index]`` (a CPU tensor) as float32 numpy."""
    import torch

    picked = rows[torch.from_numpy(index)]
    if picked.dtype not in (torch.float32, torch.float64):
        picked = picked.float()
    return picked.numpy()


def best_candidates(logits: Any) -> np.ndarray:
    """``[n, 1]`` int64: each row's highest-scoring id (the first on ties), as a new array.

    On CPU this is numpy's argmax over a view of the logits (bf16 widened first): torch's CPU
    argmax is an order of magnitude slower on a row of a few thousand values.

    >>> import torch
    >>> best_candidates(torch.tensor([[0.1, 2.0, 2.0], [3.0, -1.0, 0.0]])).tolist()
    [[1], [0]]
    """
    import torch

    if logits.device.type != "cpu":
        return logits.argmax(dim=-1, keepdim=True).cpu().numpy().astype(np.int64, copy=False)
    if logits.dtype not in (torch.float32, torch.float64, torch.float16):
        logits = logits.float()
    return logits.numpy().argmax(axis=-1).astype(np.int64)[:, None]
