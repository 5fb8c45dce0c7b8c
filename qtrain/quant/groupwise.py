"""Group-wise asymmetric int8 quantization: uint8 codes plus a float scale and offset per group.

Layout. A weight of shape (m, n) is flattened row-major and cut into G = m*n/g groups of g consecutive
elements (groups straddle rows when n % g != 0). Storage:
    codes  uint8 (m, n)     one byte per weight
    scale  (G,) meta dtype  Δ_k = (max_k - min_k) / 255
    offset (G,) meta dtype  min_k
    dequantized w = codes * scale + offset
The offset is a float (the group minimum), not the official integer zero point: an all-positive or
all-negative group is represented without clipping (docs/algorithms.md §12), and min/max land exactly on codes 0/255.
A size that is not a multiple of g is rejected (no padding): every LLaMA size qtrain ships divides 128.

Ranges are recomputed from the new values at every requantization (as the official code does), so a
weight can grow without ever clipping; with a zero update the ranges, and hence the codes, are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

CODE_MAX = 255  # uint8 codes 0..255
MIN_RANGE = 1e-12  # a constant group gets Δ = 1e-12/255; its values still dequantize exactly (offset)


def num_groups(shape: torch.Size | tuple[int, ...], group_size: int) -> int:
    numel = 1
    for s in shape:
        numel *= s
    if group_size <= 0 or numel % group_size != 0:
        raise ValueError(
            f"cannot quantize a weight of shape {tuple(shape)} ({numel} elements) in groups of {group_size}: "
            f"the element count must be a multiple of the group size; set [quant] group_size to a "
            f"divisor of {numel} (e.g. 64 or 128) or leave this layer unquantized"
        )
    return numel // group_size


def _round_meta(lo: Tensor, hi: Tensor, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale and offset rounded to meta_dtype such that [lo, hi] still fits in codes 0..255.

    For a narrow meta dtype (bf16) the offset is rounded down and the scale up, so no value is clipped.
    """
    offset = lo.to(meta_dtype)
    if meta_dtype != torch.float32:
        too_high = offset.float() > lo
        offset = torch.where(too_high, torch.nextafter(offset, torch.full_like(offset, -float("inf"))), offset)
    scale32 = (hi - offset.float()).clamp_min(MIN_RANGE) / CODE_MAX
    scale = scale32.to(meta_dtype)
    if meta_dtype != torch.float32:
        too_small = scale.float() * CODE_MAX + offset.float() < hi
        scale = torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return scale, offset


def group_ranges(groups: Tensor, meta_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-group (scale, offset) of fp32 groups (G, g)."""
    lo, hi = torch.aminmax(groups, dim=1)  # (G,), (G,)
    return _round_meta(lo, hi, meta_dtype)


def to_grid(groups: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Continuous code positions v = (w - offset) / scale in fp32, shape (G, g)."""
    return (groups - offset.float()[:, None]) / scale.float()[:, None]


def quantize_groupwise(
    w: Tensor, group_size: int = 128, meta_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-rounding quantization (used once, at initialisation).

    w: any float tensor, numel divisible by group_size. Returns codes uint8 (w.shape), scale (G,), offset (G,).
    Error per element <= scale/2.
    """
    G = num_groups(w.shape, group_size)
    groups = w.detach().reshape(G, group_size).float()  # (G, g)
    scale, offset = group_ranges(groups, meta_dtype)
    v = to_grid(groups, scale, offset)
    codes = v.round_().clamp_(0, CODE_MAX).to(torch.uint8)
    return codes.reshape(w.shape), scale, offset


def dequantize_groupwise(
    codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """codes (any shape, numel = G*g) -> weights of the same shape in `dtype`, computed in fp32."""
    G = scale.numel()
    # one fp32 buffer, updated in place (same two roundings as `codes * scale + offset`, no FMA)
    w = codes.reshape(G, group_size).float().mul_(scale.float()[:, None]).add_(offset.float()[:, None])  # (G, g)
    return w.reshape(codes.shape).to(dtype)


def dequantize_groupwise_bytes(numel: int, dtype: torch.dtype) -> int:
    """Peak bytes of `dequantize_groupwise` (the result included): its one fp32 buffer, and at the final cast to
    a narrower dtype that buffer beside the result."""
    return torch.float32.itemsize * numel + (0 if dtype == torch.float32 else dtype.itemsize * numel)
