"""Adam as a qtrain method (fallback for non-matrix tensors in the standalone optimizers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.optim.base import F32, DirectionBytes, Method, Update


def adam_direction(grad: Tensor, m: Tensor, v: Tensor, step: int, betas: tuple[float, float], eps: float) -> Tensor:
    """Updates m, v in place (fp32) and returns κ_t · m / (√v + ε) (apollo.py's AdamW path, ε outside)."""
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    kappa = math.sqrt(1 - b2**step) / (1 - b1**step)
    return (m / (v.sqrt() + eps)).mul_(kappa)


@dataclass
class Adam(Method):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        zeros = torch.zeros(shape, device=device, dtype=torch.float32)
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        state["step"] += 1
        d = adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], state["step"], self.betas, self.eps)
        return Update(dense=d)

    def direction_bytes(self, shape: tuple[int, ...], grad_dtype: torch.dtype) -> DirectionBytes:
        """`m / (v.sqrt() + eps)`: two fp32 temporaries, the second is the returned direction."""
        numel = math.prod(shape)
        return DirectionBytes(2 * F32 * numel, F32 * numel, True)
