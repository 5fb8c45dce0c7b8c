"""One training step's device work, the body both the eager loop and a captured step run.

Forward and backward of each micro-batch (in release mode every tensor is updated inside backward), then
`Updater.finish_step` (the updates of gradients still present, the fused vector update, the exactly-once
check). The caller has called `Updater.begin_step` (the step's LR, step and seeds, written on the device).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from qtrain.model.loss import lm_loss
from qtrain.update.updater import Updater


def train_step(model: nn.Module, updater: Updater, batches: Iterable[tuple[Tensor, Tensor]], dtype: torch.dtype,
               divisor: int = 1) -> Tensor:
    """The step's loss (a device scalar, not synced): the mean over `divisor` micro-batches of the global step.

    divisor: micro-batches per step over all ranks (grad_accum_steps x world size): each loss is divided by it
    before backward, so the gradients summed over micro-batches and ranks are the global mean.
    """
    step_loss = None
    for x, y in batches:
        loss = lm_loss(model, x, y, dtype)
        (loss / divisor).backward()  # release mode: every tensor is updated in here
        part = loss.detach() / divisor
        step_loss = part if step_loss is None else step_loss + part
    updater.finish_step()
    return step_loss
