"""Stochastic rounding (SR) onto the int8 group grid, from a dedicated generator.

SR rounds v to floor(v) + Bernoulli(v - floor(v)), so E[SR(v)] = v: updates much smaller than one
quantization step still move the weight on average, where nearest rounding would drop them.
All arithmetic is fp32 (the official code does it in bf16, which biases SR: docs/algorithms.md §12).
The uniform numbers come from a torch.Generator the caller owns (never the global RNG); qtrain seeds
one per (run seed, tensor, step), so a resumed run draws the same numbers with no generator state saved.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from qtrain.quant.groupwise import CODE_MAX, group_ranges, num_groups, to_grid


def stochastic_round(v: Tensor, uniform: Tensor) -> Tensor:
    """floor(v) + [u < frac(v)] for fp32 v, u ~ U[0, 1) of v's shape. Returns fp32 integers.

    Only floor(v) or ceil(v) can come out; an integer v is returned unchanged (frac = 0 < u never holds).
    """
    lower = torch.floor(v)
    return lower + (uniform < (v - lower)).to(v.dtype)


UNIFORM_BITS = 16  # the update's SR uniforms: two per 32-bit Philox word in the Triton kernel (half the rounds)


def sr_uniforms(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """fp32 uniforms on the centred 2⁻¹⁶ lattice {(k + 1/2)·2⁻¹⁶ : k = 0 .. 2¹⁶-1}, the update's SR noise.

    The Triton update kernel builds the same values from 16-bit halves of its Philox words. With u on this
    lattice, P(u < f) = ceil(f·2¹⁶ - 1/2)/2¹⁶ differs from f by less than 2⁻¹⁷ (the half centres it; k·2⁻¹⁶
    would bias every rounding up), so SR stays unbiased to within 2⁻¹⁷ of a quantization step.
    One fp32 buffer, like torch.rand: randint writes the integers k straight into fp32 (exact below 2²⁴).
    """
    k = torch.randint(0, 1 << UNIFORM_BITS, shape, generator=generator, device=device, dtype=torch.float32)
    return k.add_(0.5).mul_(2.0**-UNIFORM_BITS)  # both exact


def skip_uniforms(generator: torch.Generator, count: int, device: torch.device | str) -> None:
    """Advance a CPU generator past `count` of sr_uniforms' numbers (one 32-bit draw per element, in row-major
    order, whatever the chunking): what rows r0.. of a tensor draw after skipping r0 * n."""
    block = 1 << 22
    while count > 0:
        k = min(count, block)
        torch.randint(0, 1 << UNIFORM_BITS, (k,), generator=generator, device=device, dtype=torch.float32)
        count -= k


def quantize_groupwise_sr(
    w: Tensor, group_size: int, generator: torch.Generator, meta_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Stochastic-rounding quantization with fresh per-group ranges. Same outputs as quantize_groupwise."""
    G = num_groups(w.shape, group_size)
    groups = w.detach().reshape(G, group_size).float()  # (G, g)
    scale, offset = group_ranges(groups, meta_dtype)
    v = to_grid(groups, scale, offset)
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    codes = stochastic_round(v, u).clamp_(0, CODE_MAX).to(torch.uint8)
    return codes.reshape(w.shape), scale, offset


def rows_per_chunk(shape: tuple[int, int], group_size: int, max_elems: int) -> int:
    """Rows per chunk such that each chunk holds whole groups and about max_elems elements."""
    m, n = shape
    unit = math.lcm(n, group_size) // n  # smallest row count that ends on a group boundary
    return max(unit, (max_elems // (n * unit)) * unit) if m > unit else m


@torch.no_grad()
def requantize_sr_(
    codes: Tensor,
    scale: Tensor,
    offset: Tensor,
    group_size: int,
    new_rows: Callable[[int, int, Tensor], Tensor],
    generator: torch.Generator | None,
    max_chunk_elems: int = 1 << 22,
) -> None:
    """In place: W <- SR(new_rows(r0, r1, dequant(W[r0:r1]))) chunk by chunk over rows.

    codes: uint8 (m, n); scale/offset: (G,). new_rows gets the fp32 rows (r1-r0, n) and returns their new
    values (it may work in place). generator=None rounds to nearest instead of SR. Chunking keeps the fp32 transients at ~max_chunk_elems elements
    (weights/grid positions, uniforms, floor; the fp32 rows are transient too) instead of a full fp32 copy of the weight.
    """
    m, n = codes.shape
    rows = rows_per_chunk((m, n), group_size, max_chunk_elems)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        g0, g1 = r0 * n // group_size, r1 * n // group_size  # exact: chunks end on group boundaries
        block = codes[r0:r1]  # (k, n) view
        sc, off = scale[g0:g1], offset[g0:g1]
        # In-place chain: w, then v = grid position, share one fp32 buffer (peak ≈ 3 fp32 + 2 byte buffers).
        w = block.reshape(-1, group_size).float().mul_(sc.float()[:, None]).add_(off.float()[:, None])  # (Gc, g)
        w = new_rows(r0, r1, w.view(r1 - r0, n)).view(-1, group_size)
        new_scale, new_offset = group_ranges(w, scale.dtype)
        # grid position (w - offset) * (1/scale): one IEEE reciprocal per group, not a division per element
        # (the Triton twin does the same); within 3u relative (a few ulp) of to_grid's quotient
        v = w.sub_(new_offset.float()[:, None]).mul_(new_scale.float().reciprocal()[:, None])
        if generator is None:  # nearest rounding (comparison mode)
            codes_f = v.round_()
        else:
            u = sr_uniforms(v.shape, generator, v.device)
            lower = torch.floor(v)
            codes_f = lower.add_(u.lt_(v.sub_(lower)))  # floor(v) + [u < frac(v)] = stochastic_round(v, u)
            del u, lower
        block.copy_(codes_f.clamp_(0, CODE_MAX).view(r1 - r0, n))
        sc.copy_(new_scale)
        off.copy_(new_offset)
        del w, v, codes_f  # free this chunk's buffers before the next chunk allocates its own


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 -> bf16 with stochastic rounding: add 16 random low bits, truncate (E[result] = x).

    The bf16 value is the top half of the fp32 bit pattern; adding U{0..2^16-1} to the dropped half
    carries into the kept half with probability (dropped bits)/2^16, i.e. proportionally to the
    distance to the next bf16 value. Finite inputs only (an overflow past the largest bf16 becomes inf).
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    bits = (bits + noise) & -65536  # -65536 = 0xFFFF0000 as int32: clear the low 16 bits
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
