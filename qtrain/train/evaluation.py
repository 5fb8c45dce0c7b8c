"""The validation loss over fixed windows."""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.recipe import LoopConfig
from qtrain.data.protocols import RunData
from qtrain.model.loss import lm_loss


@torch.no_grad()
def evaluate(model: nn.Module, data: RunData, loop_cfg: LoopConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Mean validation loss over the same eval_batches windows every time (correct divisor n, not n + 1)."""
    model.eval()
    total, n = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in data.val_batches(loop_cfg.eval_batches, loop_cfg.batch_size, loop_cfg.seq_len):
        total += lm_loss(model, x.to(device), y.to(device), dtype).double()
        n += 1
    model.train()
    divisor = n + 1 if loop_cfg.legacy_eval_divisor else n  # legacy: the official code's n + 1 (algorithms.md §17)
    return total.item() / divisor
