"""The interface every qtrain optimizer method implements, and the torch.optim.Optimizer around it.

A *method* (APOLLO, GaLore, ...) is hyperparameters plus two functions of tensors:
    init_state(shape, device, uid) -> state dict        (fp32 tensors and python ints)
    direction(grad, state) -> Update                    (advances state["step"])
The same method object serves three callers without change: the standalone optimizer
(qtrain.optim.method_optimizer, float weights), qtrain's layer-wise release hooks (float and int8 weights), and the ordinary non-release step.
An Update D is applied as   W <- (W - lr * D) * (1 - lr * weight_decay)   (decoupled decay after the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.quant.stochastic_round import stochastic_round_to_bf16

F32 = torch.float32.itemsize


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


APPLY_CHUNK_ELEMS = 1 << 22  # apply_update_'s chunk of rows: its fp32 transients are a few of these


@torch.no_grad()
def apply_update_(weight: Tensor, update: Update, grad: Tensor, lr: float | Tensor, weight_decay: float,
                  generator: torch.Generator | None = None, max_chunk_elems: int = APPLY_CHUNK_ELEMS) -> None:
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


class DirectionBytes(NamedTuple):
    """Memory of one `Method.direction` call on one tensor, beyond the gradient and the state (qtrain estimate)."""

    peak: int  # bytes of the transients alive at the call's peak, the returned direction included
    dense: int  # bytes of the dense direction it returns (0 for a gradient multiplier)
    exact: bool  # False where the figure is an approximation (the estimate says so)


def apply_update_bytes(shape: tuple[int, ...], param_dtype: torch.dtype, grad_dtype: torch.dtype, dense: bool) -> int:
    """Transient bytes of `apply_update_`, chunk by chunk of at most APPLY_CHUNK_ELEMS elements (a 1-D tensor at
    once): `update.rows()` builds grad.float() (a copy when bf16) * scale, 4 B per element (a dense fp32 direction
    is sliced as a view); `w = rows.float()` (a copy for bf16 weights); `d * lr` (4 B); a bf16 weight is written
    back by stochastic_round_to_bf16: int32 noise, bits + noise and `& mask` (4 B each) while w and d are alive."""
    numel = math.prod(shape)
    if len(shape) > 1:
        cols = numel // shape[0]
        ce = min(numel, max(1, APPLY_CHUNK_ELEMS // cols) * cols)
    else:
        ce = numel
    low = param_dtype != torch.float32
    d = 0 if dense else F32 * ce
    build_d = 0 if dense else (2 if grad_dtype != torch.float32 else 1) * F32 * ce
    w = F32 * ce if low else 0
    return max(build_d, w + d + F32 * ce, w + d + 3 * F32 * ce if low else 0)


@dataclass
class Method:
    """Base of all methods: hyperparameters shared by every method, and what callers may use.

    Callers (the Updater, the release hooks, the standalone optimizer, the estimator) use exactly this:
    init_state, direction (with the caller's step clock, and norm_out where measures_grad_norm), validate,
    configure (the recipe's run-wide choices, once, at build), prepare (before each step), kept_projections,
    direction_bytes and the class attributes accepts_low_precision_grad and measures_grad_norm. A method without
    device kernels or kept buffers inherits the no-op defaults.
    """

    weight_decay: float = 0.0

    # direction() takes a bf16 gradient as is and upcasts it chunk by chunk itself (no fp32 copy from callers)
    accepts_low_precision_grad: ClassVar[bool] = False
    # direction() takes `norm_out`, a 0-d fp32 tensor, and writes the gradient's norm ‖G‖ into it from a pass
    # it makes anyway (the Updater's gradient-norm meter then launches nothing for this tensor)
    measures_grad_norm: ClassVar[bool] = False

    def init_state(self, shape: tuple[int, ...], device: torch.device, uid: int) -> dict[str, Any]:
        raise NotImplementedError

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        """D of the next update; advances state["step"]. clock: the calling Updater's step values on the device
        (qtrain.core.step_state), which device kernels read so that a captured step replays correctly; None
        reads them from the host (the standalone optimizer)."""
        raise NotImplementedError

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raise HyperparameterError naming the hyperparameter if the method cannot handle this shape."""

    def configure(self, kernels: str = "auto", keep_projections: bool = False) -> None:
        """The recipe's run-wide choices, set once when the Updater is built: `kernels` ([quant] kernels,
        qtrain.quant.dispatch's convention) for the method's own device kernels, `keep_projections`
        ([train] cuda_graph) to keep per-tensor buffers a captured step reads. Ignored by default."""

    def prepare(self, state: dict[str, Any], shape: tuple[int, ...], t: int) -> None:
        """Before update t, outside any captured region (Updater.begin_step). Nothing by default."""

    def kept_projections(self) -> dict[int, Tensor]:
        """Buffers kept across steps beside the state (by tensor uid): none by default."""
        return {}

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Transient bytes of `direction` on a gradient of this shape and dtype (the estimator asks each method).

        Default, approximate: a dense fp32 direction (m x n) and one fp32 temporary of that size."""
        full = F32 * math.prod(shape)
        return DirectionBytes(2 * full, full, False)
