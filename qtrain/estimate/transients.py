"""Transient bytes of the code paths one step runs, each asked of the code that owns it.

The optimizer methods answer for their direction (`Method.direction_bytes`), the int8 kernel dispatch for its
choices and their buffers (`dispatch.plan` -> `KernelPlan`), `float_update_bytes` and the float optimizers'
`step_bytes` for the float updates, and the loss module's `vocab_chunk` for the loss. What is left here is how
the Updater strings them together, and the loss (its two paths, modelled line by line below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.model.loss import vocab_chunk
from qtrain.optim.base import Method
from qtrain.optim.float_adam import step_bytes
from qtrain.optim.float_update import float_update_bytes
from qtrain.quant.dispatch import KernelPlan
from qtrain.quant.linear import Int8Linear
from qtrain.update.updater import Updater

F32 = torch.float32.itemsize


def grad_copy_bytes(method: Method, grad_dtype: torch.dtype, numel: int) -> int:
    """Updater._grad_for: an fp32 copy of a low-precision gradient, unless the method upcasts chunk-wise."""
    if method.accepts_low_precision_grad or grad_dtype == torch.float32:
        return 0
    return F32 * numel


def int8_update_bytes(layer: Int8Linear, method: Method, plan: KernelPlan, grad_dtype: torch.dtype,
                      rounding: str) -> int:
    """Updater.update_int8, beyond the gradient itself: `direction(_grad_for(grad))` (the fp32 gradient copy, if
    any, plus the method's own transients), then `dispatch.int8_scaled_update_` while a dense direction is alive."""
    shape = tuple(layer.codes.shape)
    d = method.direction_bytes(shape, grad_dtype)
    direction = grad_copy_bytes(method, grad_dtype, shape[0] * shape[1]) + d.peak
    return max(direction, d.dense + plan.update_bytes(shape, layer.group_size, rounding == "stochastic"))


def float_update_bytes_of(name: str, updater: Updater, device_type: str) -> int:
    """Updater.update_float, beyond the gradient itself (float_grad_clip's norms are not modelled): a method's
    direction and `float_update_`, or the tensor's own float optimizer step."""
    p = updater.floats[name]
    shape, dtype = tuple(p.shape), p.dtype
    if name not in updater.method_floats:
        return step_bytes(updater.float_opts[name], p, device_type)
    method = updater.method_floats[name]
    d = method.direction_bytes(shape, dtype)
    direction = grad_copy_bytes(method, dtype, p.numel()) + d.peak
    return max(direction, d.dense + float_update_bytes(shape, dtype, d.dense > 0, device_type, updater.kernels))


@dataclass
class ChunkedLoss:
    """qtrain.model.loss.linear_cross_entropy for N tokens, vocabulary V in chunks of Vc columns (bytes).

    Forward, per chunk: the compute-dtype rows of W (s·Vc·d, a copy unless F is c), the chunk's logits in c
    (s·N·Vc) beside their fp32 upcast (4·N·Vc; one tensor when c is fp32), then exp in place; the running max,
    sum and target logit (3 x 4·N) across chunks. It saves lse (4·N) and lm_head's c input (counted as lm_head's).
    Backward, per chunk: the same logits again, the fp32 softmax turned in place into the gradient, its c copy g
    (s·N·Vc unless c is fp32; the fp32 one is freed then), then g·W (s·N·d) into the fp32 dX accumulator (4·N·d),
    and gᵀ·h for dW's rows (s·Vc·d, only when W's dtype F is not c: else written into dW in place); the per-token
    scale (4·N). At the end dX is cast to the residual dtype R (r·N·d beside it, unless R is fp32).
    dW (F·V·d) is computed by the loss's backward under FSDP2 (`both`), else in a pass of its own at the end of
    backward (`dx`, then `dw`: the chunks again, with only dW beside them).
    """

    forward: int  # transients of the loss forward at its peak
    saved: int  # lse, kept for backward (and for the deferred dW)
    dx: int  # the loss backward computing dX only, at its peak (the fp32 accumulator included)
    dw: int  # the deferred dW pass's transients at its peak, dW itself excluded
    both: int  # the loss backward computing dX and dW (FSDP2), dW and the accumulator included
    weight_grad: int  # dW (F·V·d), whole after the last chunk: what lm_head's hook receives


def chunked_loss_bytes(N: int, V: int, d: int, compute: torch.dtype, F: torch.dtype, R: torch.dtype
                       ) -> ChunkedLoss | None:
    """The chunked loss's bytes, or None where `vocab_chunk` keeps one chunk (the plain path runs)."""
    Vc = vocab_chunk(N, V)
    if Vc >= V:
        return None
    s, wide = compute.itemsize, compute != torch.float32
    w = s * Vc * d if F != compute else 0
    logits = (s * N * Vc if wide else 0) + F32 * N * Vc  # c logits beside their fp32 upcast
    to_c = F32 * N * Vc + (s * N * Vc if wide else 0)  # the fp32 gradient beside its c copy
    g = s * N * Vc if wide else F32 * N * Vc
    chunk = w + max(logits, to_c)  # one chunk's logits and gradient
    dw_rows = s * Vc * d if F != compute else 0
    grad_w, grad_h, scale = F.itemsize * V * d, F32 * N * d, F32 * N
    cast_dx = R.itemsize * N * d if R != torch.float32 else 0
    return ChunkedLoss(
        forward=w + logits + 3 * F32 * N, saved=F32 * N,
        dx=scale + grad_h + max(chunk, w + g + s * N * d, cast_dx),
        dw=scale + max(chunk, w + g + dw_rows),
        both=scale + grad_w + grad_h + max(chunk, w + g + max(dw_rows, s * N * d), cast_dx),
        weight_grad=grad_w)
