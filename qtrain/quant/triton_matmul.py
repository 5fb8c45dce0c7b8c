"""Fused dequantize-GEMM for int8 weights: y = x Ŵᵀ (forward) and dx = dy Ŵ (backward), Ŵ never in memory.

The unfused path (dispatch.dequantize, then cuBLAS) writes Ŵ in the compute dtype and reads it back: for a
7B projection at 256 tokens that round trip moves 1.5x the bytes of the int8 codes twice over, about as long
as the GEMM itself. Here each (BLOCK_N, BLOCK_K) weight tile is dequantized in registers right before its
tl.dot. Whether that wins depends on the GEMM's shape and the GPU: tools/bench_matmul.py measures both, and
`[quant] matmul` picks one.

References (plain torch, same signatures): int8_matmul_reference and int8_matmul_grad_input_reference,
dequantize_groupwise then matmul. The dequantized tile is bit-identical to the reference's Ŵ (the same fp32
roundings as triton_kernels, round to nearest even for bf16); only the order in which the dot products are
summed differs (BLOCK_K chunks vs cuBLAS's), so outputs agree up to fp32 accumulation rounding. Fed an
identity matrix, the kernels return Ŵᵀ and Ŵ exactly (tests/test_triton_matmul.py).

Layout (groupwise.py): codes uint8 (N, K) = (out_features, in_features), groups of g consecutive elements of
the row-major flattening. Two tilings, chosen per weight: where every group lies inside one row and BLOCK_K
divides g (ALIGNED: K % g == 0, g >= the largest BLOCK_K), a weight tile takes one scale and one offset per row;
otherwise (groups straddling rows, e.g. in_features 5461 of the 1b recipe) each element gathers its group's
scale and offset, and K is masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant.groupwise import dequantize_groupwise
from qtrain.quant.triton_kernels import HAVE_TRITON, _jit, interpret_mode, weight_problems

if HAVE_TRITON:  # without it the references serve; the kernels below stay plain, never-launched functions
    import triton
    import triton.language as tl

    from qtrain.quant.triton_kernels import _bf16_rne

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET_BLOCK = 16  # every block dimension in Triton's CPU interpreter (tl.dot's minimum): tiny test shapes


def int8_matmul_reference(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Tensor:
    """x (M, K) @ Ŵᵀ -> (M, N) in x.dtype, Ŵ = dequantize_groupwise(codes (N, K), ...) in x.dtype."""
    return x @ dequantize_groupwise(codes, scale, offset, group_size, x.dtype).t()


def int8_matmul_grad_input_reference(dy: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int
                                     ) -> Tensor:
    """dy (M, N) @ Ŵ -> (M, K) in dy.dtype: the input gradient of y = x Ŵᵀ."""
    return dy @ dequantize_groupwise(codes, scale, offset, group_size, dy.dtype)


def fused_problems(a: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int,
                   need_triton: bool = True) -> list[str]:
    """Why the fused kernels cannot take these tensors (empty if they can)."""
    problems = weight_problems(codes, scale, offset, group_size, need_triton)
    if group_size & (group_size - 1):
        problems.append(f"group size {group_size} must be a power of two dividing the weight's {codes.numel()} "
                        f"elements")
    if a.dtype not in COMPUTE_DTYPES or a.dim() != 2:
        problems.append(f"the activation must be 2-D fp32, bf16 or fp16, got {a.dtype} {tuple(a.shape)}")
    if a.numel() >= 2**31:
        problems.append(f"{a.numel()} activation elements >= 2^31 (the kernels index with int32)")
    return problems


def check_supported(a: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> None:
    """Raise ValueError if the fused kernels cannot take these tensors (the references can)."""
    problems = fused_problems(a, codes, scale, offset, group_size)
    if problems:
        raise ValueError("the fused int8 matmul cannot handle this weight: " + "; ".join(problems)
                         + ". Use [quant] matmul = \"dequantize\".")


# ---------------------------------------------------------------------------------------------------
# kernels


@_jit()
def _dequant_tile(codes_ptr, scale_ptr, offset_ptr, offs_n, offs_k, k0, N, K,
                  GROUP: tl.constexpr, ALIGNED: tl.constexpr, RNE_BF16: tl.constexpr):
    """Ŵ[offs_n, offs_k] (BLOCK_N, BLOCK_K) in fp32 (bf16-valued if RNE_BF16); out-of-range elements read 0.

    ALIGNED: offs_k lies inside the one group of each row that starts at k0 (BLOCK_K | GROUP | K).
    """
    nmask = offs_n < N
    ptrs = codes_ptr + offs_n[:, None] * K + offs_k[None, :]
    if ALIGNED:
        c = tl.load(ptrs, mask=nmask[:, None], other=0).to(tl.float32)
        gid = offs_n * (K // GROUP) + k0 // GROUP  # (BLOCK_N,)
        sc = tl.load(scale_ptr + gid, mask=nmask, other=0.0).to(tl.float32)
        off = tl.load(offset_ptr + gid, mask=nmask, other=0.0).to(tl.float32)
        w = c * sc[:, None] + off[:, None]  # two roundings, as the reference (no FMA: enable_fp_fusion=False)
    else:
        mask = nmask[:, None] & (offs_k < K)[None, :]
        c = tl.load(ptrs, mask=mask, other=0).to(tl.float32)
        gid = (offs_n[:, None] * K + offs_k[None, :]) // GROUP  # (BLOCK_N, BLOCK_K)
        sc = tl.load(scale_ptr + gid, mask=mask, other=0.0).to(tl.float32)
        off = tl.load(offset_ptr + gid, mask=mask, other=0.0).to(tl.float32)
        w = c * sc + off
    if RNE_BF16:  # the interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest even): round here
        w = _bf16_rne(w)
    return w


@_jit()
def _tile_ids(M, N_OUT, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, SWIZZLE: tl.constexpr):
    """Program id -> (pid_m, pid_o), walking SWIZZLE row-tiles per column so weight tiles are reused in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_o = tl.cdiv(N_OUT, BLOCK_O)
    per_group = SWIZZLE * num_o
    first_m = (pid // per_group) * SWIZZLE
    rows = tl.minimum(num_m - first_m, SWIZZLE)
    pid_m = first_m + (pid % per_group) % rows
    pid_o = (pid % per_group) // rows
    return pid_m, pid_o


@_jit()
def _int8_matmul_kernel(
    x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr, ALIGNED: tl.constexpr, RNE_BF16: tl.constexpr, IEEE: tl.constexpr,
):
    """y (M, N) = x (M, K) @ Ŵᵀ, fp32 accumulation. M_BUCKET: unused here, the autotuner's key (m_bucket)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, SWIZZLE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xmask = mmask[:, None] if ALIGNED else mmask[:, None] & (offs_k < K)[None, :]  # ALIGNED: BLOCK_K | K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xmask, other=0.0)
        w = _dequant_tile(codes_ptr, scale_ptr, offset_ptr, offs_n, offs_k, k0, N, K, GROUP, ALIGNED, RNE_BF16)
        if IEEE:  # fp32 inputs (or the interpreter's upcast bf16): full-precision products, no TF32
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if RNE_BF16:
        acc = _bf16_rne(acc)
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & (offs_n < N)[None, :])


@_jit()
def _int8_matmul_grad_input_kernel(
    dy_ptr, codes_ptr, scale_ptr, offset_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm, M_BUCKET,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr, ALIGNED: tl.constexpr, RNE_BF16: tl.constexpr, IEEE: tl.constexpr,
):
    """dx (M, K) = dy (M, N) @ Ŵ, fp32 accumulation; ALIGNED: the output tile's K range is inside one group."""
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, SWIZZLE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mmask[:, None] & (offs_n < N)[None, :], other=0.0)
        w = _dequant_tile(codes_ptr, scale_ptr, offset_ptr, offs_n, offs_k, k0, N, K, GROUP, ALIGNED, RNE_BF16)
        if IEEE:
            acc = tl.dot(dy.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w.to(dy.dtype), acc)
    if RNE_BF16:
        acc = _bf16_rne(acc)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & (offs_k < K)[None, :])


# ---------------------------------------------------------------------------------------------------
# launch configurations: autotuned on a GPU (once per M bucket and shape), fixed in the interpreter


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) in the style of Triton's matmul tutorial for Hopper/Ampere; the
# autotuner times them per (M bucket, N, K, dtypes) on the GPU at hand. Every BLOCK_K divides MAX_BLOCK_K
# (see aligned()). The dx kernel's output tile is (BLOCK_M, BLOCK_K) and it loops over N in BLOCK_N steps, so
# it gets its own list: the forward's (128, 256, 64, 3 stages) needs ~260 KiB of shared memory there.
FORWARD_SHAPES = ((128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                  (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 32, 5, 2), (32, 64, 32, 5, 2))
GRAD_INPUT_SHAPES = ((128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                     (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 5, 2), (32, 64, 32, 5, 2))
MAX_BLOCK_K = 64
SMEM_LIMIT = 227 * 1024  # per-block opt-in maximum of sm_90 (H100/H200); the device's own value when known


def smem_bytes(kind: str, bm: int, bn: int, bk: int, stages: int, operand_bytes: int) -> int:
    """Shared memory of one config, an upper estimate: `stages` pipelined copies of the activation tile
    (forward x (bm, bk), dx dy (bm, bn)) and the uint8 code tile (bn, bk), plus the dequantized weight tile
    staged once as the MMA operand (bn, bk). operand_bytes: 2 (bf16/fp16) or 4 (fp32, the IEEE path).
    The dx (128, 256, 64, 3 stages) bf16 config comes out at 272 KiB (compiled for sm_90: 260 KiB)."""
    if kind not in ("forward", "grad_input"):
        raise ValueError(f"kind = {kind!r}; allowed: ('forward', 'grad_input')")
    act = bm * (bk if kind == "forward" else bn) * operand_bytes
    return stages * (act + bn * bk) + bn * bk * operand_bytes


def fitting(shapes, kind: str, operand_bytes: int, limit: int = SMEM_LIMIT):
    """The shapes whose smem_bytes fit in limit; the smallest one if none does (the autotuner needs one)."""
    fit = [c for c in shapes if smem_bytes(kind, *c[:4], operand_bytes) <= limit]
    return fit or [min(shapes, key=lambda c: smem_bytes(kind, *c[:4], operand_bytes))]


def m_bucket(M: int) -> int:
    """The autotuner's key for M: the next power of two (>= 16). Autotuning keyed on M itself re-benchmarks
    every new prompt length (generation grows M one token at a time); a bucket's first M picks its config."""
    return max(16, 1 << (max(1, M) - 1).bit_length())


FUSED_MIN_M = 64


def fused_expected_faster(M: int, K: int, group_size: int) -> bool:
    """Whether [quant] matmul = "fused" should run the fused kernel (backend "auto"), or dequantize + cuBLAS.

    Not where it is known to lose: gathered scales (groups straddling rows or smaller than a BLOCK_K:
    per-element scale/offset gathers, register spills, up to 311 KiB of shared memory), and M < FUSED_MIN_M,
    where one row of tiles gives only N / BLOCK_N programs (no split-K) for a whole GPU. The threshold is
    the audit's estimate, not a measurement: tools/bench_matmul.py on a GPU decides.
    """
    return M >= FUSED_MIN_M and aligned(K, group_size, interpreted=False)


def aligned(K: int, group_size: int, interpreted: bool) -> bool:
    """The per-row-scale tiling: groups inside rows, and every candidate BLOCK_K divides the group size."""
    return K % group_size == 0 and group_size >= (INTERPRET_BLOCK if interpreted else MAX_BLOCK_K)


def _smem_limit(device: torch.device) -> int:
    try:
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    except (AssertionError, AttributeError, RuntimeError, ValueError):  # no CUDA, or an older torch
        return SMEM_LIMIT


def _pruner(kind: str):
    """early_config_prune for the autotuner: drops configs over the device's shared memory for this call's
    operand width, so no tuning trial is spent compiling a kernel that cannot launch."""
    shapes_of = {}

    def prune(configs, named_args, **kwargs):
        a = named_args["x_ptr" if kind == "forward" else "dy_ptr"]
        operand_bytes = 4 if kwargs.get("IEEE") else a.element_size()
        for c in configs:
            k = c.kwargs
            shapes_of[(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, c.num_warps)] = c
        keep = fitting(list(shapes_of), kind, operand_bytes, _smem_limit(a.device))
        return [shapes_of[c] for c in keep]

    return prune


def _configs(shapes):
    assert all(MAX_BLOCK_K % bk == 0 for _, _, bk, _, _ in shapes)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWIZZLE": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


TUNE_KEY = ["M_BUCKET", "N", "K", "GROUP", "ALIGNED"]  # the autotuner adds the tensors' dtypes itself
if HAVE_TRITON and not interpret_mode():
    # cache_results: the chosen config is stored in Triton's cache directory, so a new process (a resumed
    # run, the next eval's sampling) reuses it instead of re-benchmarking, and picks the same tiles (the
    # same accumulation order, so fused outputs repeat across runs on one machine)
    _matmul_launch = triton.autotune(configs=_configs(FORWARD_SHAPES), key=TUNE_KEY, cache_results=True,
                                     prune_configs_by={"early_config_prune": _pruner("forward")})(_int8_matmul_kernel)
    _grad_input_launch = triton.autotune(
        configs=_configs(GRAD_INPUT_SHAPES), key=TUNE_KEY, cache_results=True,
        prune_configs_by={"early_config_prune": _pruner("grad_input")})(_int8_matmul_grad_input_kernel)
else:
    _matmul_launch, _grad_input_launch = _int8_matmul_kernel, _int8_matmul_grad_input_kernel


def _launch(kernel, autotuned, a: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int,
            out_cols: int) -> Tensor:
    check_supported(a, codes, scale, offset, group_size)
    if a.device != codes.device or scale.device != codes.device or offset.device != codes.device:
        raise ValueError(f"activation on {a.device}, weight on {codes.device}: move them to one device")
    a = a if a.stride(-1) == 1 else a.contiguous()
    M = a.shape[0]
    N, K = codes.shape
    out = torch.empty((M, out_cols), dtype=a.dtype, device=a.device)
    args = (a, codes, scale, offset, out, M, N, K, a.stride(0), out.stride(0), m_bucket(M))
    # Triton's interpreter (3.9) multiplies bf16 dot operands as raw bits: there the bf16 operands are widened
    # to fp32 first, which gives the same sums (a product of two bf16 values is exact in fp32)
    interpreted = autotuned is kernel
    upcast = a.dtype == torch.float32 or (a.dtype == torch.bfloat16 and interpreted)
    meta = dict(GROUP=group_size, ALIGNED=aligned(K, group_size, interpreted),
                RNE_BF16=a.dtype == torch.bfloat16 and interpreted, IEEE=upcast)
    if autotuned is kernel:  # interpreter: one small tile, every dimension 16
        b = INTERPRET_BLOCK
        grid = (triton.cdiv(M, b) * triton.cdiv(out_cols, b),)
        kernel[grid](*args, **meta, BLOCK_M=b, BLOCK_N=b, BLOCK_K=b, SWIZZLE=2, enable_fp_fusion=False)
    else:
        out_block = "BLOCK_N" if out_cols == N else "BLOCK_K"
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(out_cols, c[out_block]),)  # noqa: E731
        autotuned[grid](*args, **meta, enable_fp_fusion=False)
    return out


def int8_matmul_triton(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Tensor:
    """Twin of int8_matmul_reference: x (M, K) fp32/bf16/fp16 @ Ŵᵀ -> (M, N) in x.dtype, one kernel."""
    if x.dim() != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} must be (M, {codes.shape[1]})")
    return _launch(_int8_matmul_kernel, _matmul_launch, x, codes, scale, offset, group_size, codes.shape[0])


def int8_matmul_grad_input_triton(dy: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int
                                  ) -> Tensor:
    """Twin of int8_matmul_grad_input_reference: dy (M, N) @ Ŵ -> (M, K) in dy.dtype, one kernel."""
    if dy.dim() != 2 or dy.shape[1] != codes.shape[0]:
        raise ValueError(f"dy of shape {tuple(dy.shape)} must be (M, {codes.shape[0]})")
    return _launch(_int8_matmul_grad_input_kernel, _grad_input_launch, dy, codes, scale, offset, group_size,
                   codes.shape[1])
