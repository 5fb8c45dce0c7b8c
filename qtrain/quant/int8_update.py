"""One optimizer step applied to an int8 weight: dequantize -> W - lr·s⊙G -> stochastic requantize.

This is the plain-torch reference path. It works chunk by chunk over rows so the fp32 transients are
a few MB, never a full fp32 copy of the weight (docs/algorithms.md §12 "update of an int8 weight").
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant.stochastic_round import requantize_sr_, rows_per_chunk

MAX_CHUNK_ELEMS = 1 << 22  # elements per chunk of rows: the fp32 transients are a few of these


@torch.no_grad()
def int8_scaled_update_(
    codes: Tensor,
    scale: Tensor,
    offset: Tensor,
    group_size: int,
    grad: Tensor,
    grad_scale: Tensor,
    lr: float | Tensor,
    weight_decay: float,
    generator: torch.Generator | None,
    max_chunk_elems: int = MAX_CHUNK_ELEMS,
) -> None:
    """codes (m, n) uint8, scale/offset (G,): W <- SR((W - lr * grad_scale * grad) * (1 - lr * wd)).

    grad: (m, n) any float dtype (upcast per chunk); grad_scale broadcasts against it: shape (), (1, n)
    or (m, 1), fp32. A dense direction D is passed as grad=D, grad_scale=1. generator=None: nearest rounding.
    """
    per_row = grad_scale.dim() == 2 and grad_scale.shape[0] > 1  # (m, 1): slice it with the rows

    def new_rows(r0: int, r1: int, w: Tensor) -> Tensor:  # w: (r1-r0, n) fp32, owned by the caller
        s = grad_scale[r0:r1] if per_row else grad_scale
        w.addcmul_(grad[r0:r1], s * -lr)  # mixed dtypes promote to fp32 elementwise, no fp32 grad copy
        if weight_decay > 0:
            w.mul_(1 - lr * weight_decay)
        return w

    requantize_sr_(codes, scale, offset, group_size, new_rows, generator, max_chunk_elems)


def int8_scaled_update_bytes(shape: tuple[int, int], group_size: int, stochastic: bool) -> int:
    """Transient bytes of `int8_scaled_update_` beyond its arguments: requantize_sr_ holds three fp32 buffers of
    one chunk of rows (weights / grid positions, uniforms, floor), one with nearest rounding."""
    m, n = shape
    chunk = min(m, rows_per_chunk(shape, group_size, MAX_CHUNK_ELEMS)) * n
    return (3 if stochastic else 1) * torch.float32.itemsize * chunk
