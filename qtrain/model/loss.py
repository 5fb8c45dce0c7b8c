"""The training loss: mean next-token cross-entropy over the targets that are not ignored (-100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean next-token cross-entropy; logits upcast to fp32 for the softmax."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def lm_loss_per_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets) of each row (B,), B = x.shape[0]: what lm_loss averages.

    A row's numbers do not depend on the other rows in the batch (causal attention, no padding mask), so
    rows can be regrouped into larger batches and the batch means of lm_loss rebuilt from them.
    """
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,), 0 where ignored
    return token.view(y.shape).sum(1), (y != -100).sum(1)
