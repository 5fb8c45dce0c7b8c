"""Triton twins of APOLLO's scaling statistics (`apollo.project_with_column_norms`, `apollo.scaling_chain`).

Two launches per tensor instead of ~5 per 4 M-element chunk plus ~25 scalar ops:
  - `_project_kernel` reads Ĝ (bf16 or fp32, any strides, so Gᵀ is a view) exactly once and writes
    R = PᵀĜ (r×b) and the squared column norms of Ĝ (b,). Each program owns BLOCK_B columns of one split of
    the rows (enough splits to fill the GPU: a 4096-wide weight has only 32 column blocks) and writes its
    partial sums; no atomics, so the result is deterministic. Ranks <= 4 (APOLLO-Mini's 1) multiply in
    registers instead of a tensor-core tile padded to 16 rows of P;
  - `_chain_kernel` (one program) adds the splits' partial sums in order, runs the moment / ratio / limiter
    chain on R and writes the factor f (and, when asked, ‖Ĝ‖ from the column norms: the step's gradient norm
    without another read of Ĝ).
P is still regenerated from the tensor's seed by `random_projection` (the official seed chain keeps
working); only the arithmetic after it moved.

Numerics against the torch references, which stay the oracle (tests/test_apollo_kernels.py):
  - elementwise results (the moments m, v) are bit-identical to torch on CPU: the same fp32 operations
    with the same roundings. torch's CPU add_(alpha=β) is fma(x, β, y) and addcmul_(x, x, value=β) is
    fma(β·x, x, y); the kernel calls tl.fma for exactly those, divides with div_rn, takes sqrt_rn, and
    launches with enable_fp_fusion=False so nothing else is contracted;
  - reductions (R, column norms, ‖N‖, ‖R‖, ‖X‖) are sums in another order, so they agree within the fp32
    reduction-order bound derived in the tests (Higham, Accuracy and Stability, §3.1: any order of a
    length-k dot product is within γ_k·Σ|xᵢyᵢ| of the exact value, γ_k = ku/(1-ku), u = 2⁻²⁴).

Importable without Triton; the dispatcher (`apollo.apollo_scaling`, backend "auto" | "torch" | "triton",
the convention of qtrain.quant.dispatch) uses the torch references then.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qtrain.quant.triton_kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _jit(fn):
    return triton.jit(fn) if HAVE_TRITON else fn


MAX_RANK = 256  # one program holds all r rows of its columns: R's tile is BLOCK_R x BLOCK_B fp32 registers


def problems(g_hat: Tensor, proj: Tensor, m: Tensor) -> list[str]:
    """What keeps the kernels from taking these tensors (the torch references take any)."""
    out = []
    if not HAVE_TRITON:
        out.append("triton is not installed (pip install triton)")
    if g_hat.dim() != 2 or g_hat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        out.append(f"the gradient must be a 2-D fp32/bf16/fp16 matrix, got {g_hat.dtype} {tuple(g_hat.shape)}")
    elif proj.shape != (g_hat.shape[0], m.shape[0]) or proj.dtype != torch.float32:
        out.append(f"P must be fp32 of shape (a, r) = ({g_hat.shape[0]}, {m.shape[0]}), got {proj.dtype} "
                   f"{tuple(proj.shape)}")
    if m.shape[0] > MAX_RANK:
        out.append(f"rank {m.shape[0]} > {MAX_RANK} (one program holds all rows of R)")
    if g_hat.numel() >= 2**31 or m.numel() >= 2**31:
        out.append("a tensor with >= 2^31 elements (the kernels index with int32)")
    return out


# ---------------------------------------------------------------------------------------------------
# R = PᵀĜ and the squared column norms of Ĝ, one read of Ĝ


@_jit
def _project_kernel(
    g_ptr, p_ptr, r_ptr, colsq_ptr, a, b, rank, rows_per_split, stride_ga, stride_gb, stride_pa, stride_pr,
    BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, SMALL_RANK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    cmask = cols < b
    split = tl.program_id(1)  # this program's rows: [row0, row_end), one split of a
    row0 = split * rows_per_split
    row_end = tl.minimum(a, row0 + rows_per_split)
    ranks = tl.arange(0, BLOCK_R)  # all of r (tl.dot: padded to >= 16; padding rows of P load as 0)
    rmask = ranks < rank
    acc = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for a0 in range(row0, row_end, BLOCK_A):
        rows = a0 + tl.arange(0, BLOCK_A)
        amask = rows < row_end
        g = tl.load(g_ptr + rows[:, None] * stride_ga + cols[None, :] * stride_gb,
                    mask=amask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_A, BLOCK_B)
        pt = tl.load(p_ptr + rows[None, :] * stride_pa + ranks[:, None] * stride_pr,
                     mask=rmask[:, None] & amask[None, :], other=0.0)  # Pᵀ tile (BLOCK_R, BLOCK_A)
        if SMALL_RANK:  # r <= 4: fp32 FMAs in registers, no tensor-core tile padded to 16 rows
            acc += tl.sum(pt[:, :, None] * g[None, :, :], axis=1)
        else:
            acc = tl.dot(pt, g, acc, input_precision="ieee")  # fp32 products: "tf32" would break the bound
        sq += tl.sum(g * g, axis=0)
    base = split * rank * b  # partial sums of this split: the chain kernel adds the splits in order
    tl.store(r_ptr + base + ranks[:, None] * b + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    tl.store(colsq_ptr + split * b + cols, sq, mask=cmask)


SMALL_RANK = 4  # ranks up to this take the FMA path (APOLLO-Mini's rank 1 would fill 1/16 of a tl.dot tile)
MIN_SPLIT_ROWS = 256  # rows one program reads at least when a is split


def _project_blocks(rank: int) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_R, BLOCK_B). tl.dot path: R's tile BLOCK_R x BLOCK_B stays at <= 4096 fp32 (32 registers
    per thread at 4 warps), wide columns for r = 5..16, narrow ones for r = 256. Small ranks: the product tile
    BLOCK_R x BLOCK_A x BLOCK_B is 4096 fp32, r rows of R only."""
    block_r = triton.next_power_of_2(rank)
    if rank <= SMALL_RANK:
        return 32 // block_r, block_r, 128
    block_r = max(16, block_r)
    return 32, block_r, min(max(16, 4096 // block_r), 128)


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _splits(a: int, b: int, block_a: int, block_b: int, device: torch.device) -> tuple[int, int]:
    """(splits of a, rows per split): enough programs to fill the GPU twice over (a 4096-wide weight has 32
    column blocks of 128 for 132 SMs), each reading >= MIN_SPLIT_ROWS rows. The interpreter: one split."""
    if device.type != "cuda":
        return 1, a
    programs = 2 * _multiprocessors(device.index)
    want = min(triton.cdiv(programs, triton.cdiv(b, block_b)), max(1, a // MIN_SPLIT_ROWS))
    rows = triton.cdiv(triton.cdiv(a, max(1, want)), block_a) * block_a  # a whole number of row tiles
    return triton.cdiv(a, rows), rows


def project_with_column_norms_triton(proj: Tensor, g_hat: Tensor, splits: int | None = None
                                     ) -> tuple[Tensor, Tensor]:
    """Twin of apollo.project_with_column_norms in one pass over Ĝ: R = PᵀĜ and ‖Ĝ[:, j]‖², fp32, as S partial
    sums over S splits of Ĝ's rows, (S, r, b) and (S, b) (their sums over dim 0 are R and the column norms;
    scaling_chain_triton adds them). splits: S (default: enough programs for the GPU, 1 elsewhere)."""
    a, b = g_hat.shape
    rank = proj.shape[1]
    block_a, block_r, block_b = _project_blocks(rank)
    if splits is None:
        splits, rows = _splits(a, b, block_a, block_b, g_hat.device)
    else:
        rows = triton.cdiv(triton.cdiv(a, splits), block_a) * block_a
        splits = triton.cdiv(a, rows)
    r = torch.empty((splits, rank, b), device=g_hat.device, dtype=torch.float32)
    col_sq = torch.empty((splits, b), device=g_hat.device, dtype=torch.float32)
    _project_kernel[(triton.cdiv(b, block_b), splits)](
        g_hat, proj, r, col_sq, a, b, rank, rows, g_hat.stride(0), g_hat.stride(1), proj.stride(0), proj.stride(1),
        BLOCK_A=block_a, BLOCK_R=block_r, BLOCK_B=block_b, SMALL_RANK=rank <= SMALL_RANK, num_warps=4,
    )
    return r, col_sq


# ---------------------------------------------------------------------------------------------------
# moments -> N -> ratio s -> ‖X‖ -> limiter -> f, one program


@_jit
def _chain_kernel(
    r_ptr, colsq_ptr, m_ptr, v_ptr, phi_ptr, f_ptr, norm_ptr, rank, b, splits,
    b1, b2, one_minus_b1, one_minus_b2, eps, c1, c2, gamma, factor, front, step_ptr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, CHANNEL: tl.constexpr, INSIDE: tl.constexpr,
    FIRST: tl.constexpr, STEP_IS_PTR: tl.constexpr, HAS_NORM: tl.constexpr,
):
    if STEP_IS_PTR:  # fp64 (t, c1, c2, factor) on the device (apollo.step_constants): capturable
        c1 = tl.load(step_ptr + 1).to(tl.float32)  # rounded to fp32 as the host values are at launch
        c2 = tl.load(step_ptr + 2).to(tl.float32)
        factor = tl.load(step_ptr + 3).to(tl.float32)
    ranks = tl.arange(0, BLOCK_R)
    rmask = ranks < rank
    x_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)  # channel: Σ_j s_j² ‖Ĝ_j‖²
    nn_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)  # tensor: ‖N‖², ‖R‖²; both: ‖Ĝ‖² (per-lane partial sums)
    rr_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    cc_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for b0 in range(0, b, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        cmask = cols < b
        mask = rmask[:, None] & cmask[None, :]
        idx = ranks[:, None] * b + cols[None, :]
        r = tl.load(r_ptr + idx, mask=mask, other=0.0)
        c = tl.load(colsq_ptr + cols, mask=cmask, other=0.0)
        for s in range(1, splits):  # the projection kernel's partial sums, added in split order
            r += tl.load(r_ptr + s * rank * b + idx, mask=mask, other=0.0)
            c += tl.load(colsq_ptr + s * b + cols, mask=cmask, other=0.0)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        m = tl.fma(r, one_minus_b1, m * b1)  # torch CPU: m.mul_(β1).add_(R, alpha=1-β1)
        v = tl.fma(r * one_minus_b2, r, v * b2)  # torch CPU: v.mul_(β2).addcmul_(R, R, value=1-β2)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        if INSIDE:
            n = tl.math.div_rn(tl.math.div_rn(m, c1), tl.math.sqrt_rn(tl.math.div_rn(v, c2)) + eps)
        else:
            n = tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps)
        n = tl.where(mask, n, 0.0)  # padding: 0/(0+eps) is NaN when eps = 0
        if CHANNEL:
            s = tl.math.div_rn(tl.math.sqrt_rn(tl.sum(n * n, axis=0)),
                               tl.math.sqrt_rn(tl.sum(r * r, axis=0)) + 1e-8)
            tl.store(f_ptr + cols, s, mask=cmask)  # finished below, once η is known
            x_acc += s * s * c
        else:
            nn_acc += tl.sum(n * n, axis=0)
            rr_acc += tl.sum(r * r, axis=0)
        cc_acc += c
    g_norm = tl.math.sqrt_rn(tl.sum(cc_acc, axis=0))  # ‖Ĝ‖
    if HAS_NORM:  # the gradient norm of the step's metrics, at no extra read (qtrain.update.grad_norm)
        tl.store(norm_ptr, g_norm)
    if CHANNEL:
        x_norm = tl.math.sqrt_rn(tl.sum(x_acc, axis=0))
    else:
        s_t = tl.math.div_rn(tl.math.sqrt_rn(tl.sum(nn_acc, axis=0)), tl.math.sqrt_rn(tl.sum(rr_acc, axis=0)) + 1e-8)
        x_norm = s_t * g_norm
    x_norm = x_norm * front  # scale_front: α before the limiter (1.0 otherwise: exact)
    if FIRST:  # limiter.norm_growth_factor: no φ yet
        eta = 1.0
        new_phi = x_norm
    else:
        phi = tl.load(phi_ptr)
        rho = tl.math.div_rn(tl.math.div_rn(x_norm, phi + 1e-8), gamma)
        eta = tl.math.div_rn(1.0, tl.maximum(rho, 1.0))
        new_phi = x_norm * eta
        if STEP_IS_PTR:  # the first step decided on the device: the same values as FIRST above
            first = tl.load(step_ptr) == 1.0
            eta = tl.where(first, 1.0, eta)
            new_phi = tl.where(first, x_norm, new_phi)
    tl.store(phi_ptr, new_phi)
    mult = eta * factor  # torch: s * (η * (√scale · κ))
    if CHANNEL:
        for b0 in range(0, b, BLOCK_B):
            cols = b0 + tl.arange(0, BLOCK_B)
            cmask = cols < b
            tl.store(f_ptr + cols, tl.load(f_ptr + cols, mask=cmask, other=0.0) * mult, mask=cmask)
    else:
        tl.store(f_ptr, s_t * mult)


def scaling_chain_triton(
    r: Tensor, col_sq: Tensor, m: Tensor, v: Tensor, phi: Tensor, step: int, *, betas: tuple[float, float],
    eps: float, scale: float, scale_type: str, bias_correction: str, gamma: float = 1.01, scale_front: bool = False,
    step_constants: Tensor | None = None, norm_out: Tensor | None = None,
) -> Tensor:
    """Twin of apollo.scaling_chain: updates m, v (r×b) and phi (0-dim) in place, returns f ((b,) or ()).
    r, col_sq: R (r×b) and the column norms (b,), or project_with_column_norms_triton's S partial sums of them,
    (S, r, b) and (S, b), added here in order.

    step_constants: fp64 (t, c1, c2, factor) on the device (apollo.step_constants) to read in the kernel
    instead of the host step's: the same numbers, and a captured graph replays each step's.
    norm_out: a 0-d fp32 tensor that receives ‖Ĝ‖ = √Σ col_sq (the step's gradient-norm slot).
    """
    b1, b2 = betas
    c1, c2 = 1 - b1**step, 1 - b2**step  # fp64 on the host, rounded to fp32 at launch like torch's scalars
    r, col_sq = r.reshape(-1, *m.shape), col_sq.reshape(-1, m.shape[1])  # (S, r, b), (S, b)
    splits, rank, b = r.shape
    outside = bias_correction == "outside"
    factor = math.sqrt(scale) * (math.sqrt(c2) / c1 if outside else 1.0)
    on_device = step_constants is not None
    if on_device:  # no per-step number in the launch
        c1 = c2 = factor = 1.0
    channel = scale_type == "channel"
    f = torch.empty((b,) if channel else (), device=r.device, dtype=torch.float32)
    block_r = triton.next_power_of_2(rank)
    block_b = max(16, min(1024, 4096 // block_r))
    # one program: the chain is O(r·b) (APOLLO-Mini: b floats) and needs whole-tensor sums before f
    _chain_kernel[(1,)](
        r, col_sq, m, v, phi, f, phi if norm_out is None else norm_out, rank, b, splits, b1, b2, 1 - b1, 1 - b2, eps, c1, c2, gamma, factor,
        math.sqrt(scale) if scale_front else 1.0, step_constants if on_device else phi, BLOCK_R=block_r, BLOCK_B=block_b, CHANNEL=channel,
        INSIDE=not outside, FIRST=step == 1 and not on_device, STEP_IS_PTR=on_device, HAS_NORM=norm_out is not None,
        num_warps=4, enable_fp_fusion=False,
    )
    return f
