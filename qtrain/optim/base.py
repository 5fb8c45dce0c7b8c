"""The interface every qtrain optimizer method implements, and the torch.optim.Optimizer around it.

A *method* (APOLLO, GaLore, ...) is hyperparameters plus two functions of tensors:
    init_state(shape, device, uid) -> state dict        (fp32 tensors and python ints)
    direction(grad, state) -> Update                    (advances state["step"])
The same method object serves three callers without change: the standalone optimizer
(qtrain.optim.method_optimizer, float weights), qtrain's layer-wise release hooks (float and int8 weights), and the ordinary non-release step.
An Update D is applied as   W <- (W - lr * D) * (1 - lr * weight_decay)   (decoupled decay after the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qtrain.quant.stochastic_round import stochastic_round_to_bf16


class Update(NamedTuple):
    """The direction D of one step: either a dense tensor, or a multiplier of the gradient.

    grad_scale broadcasts against the *un-oriented* gradient (shape (), (1, n) or (m, 1)): APOLLO's
    update is the raw gradient times channel factors, so int8 weights can apply it chunk by chunk
    without a full-size D.
    """

    dense: Tensor | None = None
    grad_scale: Tensor | None = None

    def rows(self, grad: Tensor, r0: int, r1: int) -> Tensor:
        """D[r0:r1] in fp32 for a 2-D weight."""
        if self.dense is not None:
            return self.dense[r0:r1].float()
        s = self.grad_scale
        s = s[r0:r1] if s.dim() == 2 and s.shape[0] > 1 else s
        return grad[r0:r1].float() * s

    def full(self, grad: Tensor) -> Tensor:
        return self.dense.float() if self.dense is not None else grad.float() * self.grad_scale


@torch.no_grad()
def apply_update_(weight: Tensor, update: Update, grad: Tensor, lr: float | Tensor, weight_decay: float,
                  generator: torch.Generator | None = None, max_chunk_elems: int = 1 << 22) -> None:
    """W <- (W - lr*D) * (1 - lr*wd) on a float weight, arithmetic in fp32, chunk by chunk over rows.

    A bf16 weight with a generator is rounded stochastically (no fp32 master copy, updates below half a
    bf16 ulp survive on average); without one it is rounded to nearest. Chunks bound the fp32 transients.
    """
    w2 = weight.view(weight.shape[0], -1) if weight.dim() > 1 else weight.view(1, -1)
    flat = weight.dim() <= 1
    rows = max(1, max_chunk_elems // max(1, w2.shape[1]))
    for r0 in range(0, w2.shape[0], rows):
        r1 = min(w2.shape[0], r0 + rows)
        if flat:
            d = update.full(grad).view(1, -1)
        else:
            d = update.rows(grad, r0, r1).view(r1 - r0, -1)
        w = w2[r0:r1].float()  # a copy for bf16 weights, the weight itself for fp32 ones
        w.sub_(d * lr)
        if weight_decay > 0:
            w.mul_(1 - lr * weight_decay)
        if w.data_ptr() != w2[r0:r1].data_ptr():
            w2[r0:r1].copy_(stochastic_round_to_bf16(w, generator) if generator is not None and
                            weight.dtype == torch.bfloat16 else w)


@dataclass
class Method:
    """Base of all methods: hyperparameters shared by every method."""

    weight_decay: float = 0.0

    def init_state(self, shape: tuple[int, ...], device: torch.device, uid: int) -> dict[str, Any]:
        raise NotImplementedError

    def direction(self, grad: Tensor, state: dict[str, Any]) -> Update:
        raise NotImplementedError

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raise HyperparameterError naming the hyperparameter if the method cannot handle this shape."""
