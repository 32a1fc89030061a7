"""The optimizer update and the smoothed loss shared by specserve's training loops (the demo
model's two stages and the Medusa/Hydra heads).

    >>> smoothed(None, 2.0, 0.9), smoothed(2.0, 1.0, 0.9)
    (2.0, 1.9)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_GRAD_NORM = 1.0
"""Every loop clips the gradient norm to this."""


def optimizer_step(optimizer: "torch.optim.Optimizer", loss: "torch.Tensor",
                   parameters: Iterable["torch.nn.Parameter"], max_norm: float = MAX_GRAD_NORM) -> float:
    """One update: clear the gradients, backpropagate ``loss``, clip their norm to ``max_norm``,
    step. Returns the loss as a float."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    return float(loss.detach())


def smoothed(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average of a loss for progress logs (the first value starts it)."""
    return value if previous is None else decay * previous + (1 - decay) * value
