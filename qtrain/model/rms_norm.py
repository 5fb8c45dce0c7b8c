"""RMSNorm as one Triton kernel forward and two launches backward, with transformers' own RMSNorm as reference.

Why: transformers' LlamaRMSNorm (Mistral, Qwen2 and Qwen3 share its code) is about 8 ATen launches forward
(cast, pow, mean, add, rsqrt, mul, cast, mul) and 12 backward. A 7B model has 65 norms, so ~1,300 launches
of a step are norms (more with activation checkpointing, which runs each forward twice): host time the
step cannot afford (docs/performance.md). The fused twin computes the same function:

    h = (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype);   y = weight * h   (promoted dtype)

in one program per tile of rows (one row from 4096 wide up); backward is one kernel (dx per row, and per-block
partial sums of dweight in fp32) and one reduction of the partials. It is not bit-identical to the reference:
the row sums run in another order (fp32, a few ulp relative), and dweight is summed in fp32 before one final
rounding.

`fuse_rms_norms(model, backend)` gives every RMSNorm module of a model this forward. The backend convention
is the int8 kernels' (qtrain.quant.dispatch.use_triton): "auto" runs the kernel on CUDA and transformers'
own forward elsewhere, so CPU results do not change at all.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from qtrain.quant import dispatch
from qtrain.quant.triton_kernels import HAVE_TRITON, _jit

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from qtrain.quant.triton_kernels import _bf16_rne

MAX_COLS = 1 << 16  # one row is one tile; wider norms take the reference
ROWS_PER_PROGRAM = 16  # backward: rows whose dweight a program sums before writing one partial row
TILE = 4096  # elements a program holds at once: narrow rows go several to a tile (one 4096-wide row per tile)


@_jit()
def _cast(v, OUT_BF16: tl.constexpr):
    """fp32 -> the stored dtype's value, round to nearest even (the interpreter's bf16 cast truncates)."""
    if OUT_BF16:
        v = _bf16_rne(v)
    return v


@_jit()
def _rms_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps,
                        X_BF16: tl.constexpr, Y_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / n_cols + eps)
    h = _cast(x * rstd[:, None], X_BF16)  # .to(x.dtype)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, _cast(w[None, :] * h, Y_BF16).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@_jit()
def _rms_backward_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols,
                         X_BF16: tl.constexpr, Y_BF16: tl.constexpr, ROWS: tl.constexpr, TILE_ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, ROWS, TILE_ROWS):
        rows = pid.to(tl.int64) * ROWS + i + tl.arange(0, TILE_ROWS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # rows past the end load zeros: dw += 0
        offsets = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        h = _cast(x * rstd, X_BF16)
        dw += tl.sum(dy * h, axis=0)
        dn = _cast(_cast(dy * w[None, :], Y_BF16), X_BF16)  # grad of h: in y's dtype, then h's (autograd's casts)
        # d/dx [x·rstd] with rstd = (mean(x²) + eps)^-1/2:  dn·rstd - x·rstd³·Σ(dn·x)/n
        dx = dn * rstd - x * (rstd * rstd * rstd) * (tl.sum(dn * x, axis=1) / n_cols)[:, None]
        tl.store(dx_ptr + offsets, _cast(dx, X_BF16).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=cols < n_cols)


def _tile_rows(block: int, most: int) -> int:
    """Rows of `block` columns a program holds at once: TILE elements, at least one row, at most `most`."""
    return min(most, max(1, TILE // block))


def _is_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape, d = x.shape, x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        y_dtype = torch.float32 if torch.float32 in (weight.dtype, x.dtype) else torch.bfloat16  # promotion
        y = torch.empty(x2.shape, dtype=y_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        rows = _tile_rows(block, triton.next_power_of_2(x2.shape[0]))
        _rms_forward_kernel[(triton.cdiv(x2.shape[0], rows),)](
            x2, weight, y, rstd, x2.shape[0], d, eps, X_BF16=_is_bf16(x.dtype), Y_BF16=_is_bf16(y_dtype), ROWS=rows,
            BLOCK=block, num_warps=_warps(rows * block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, d = x2.shape
        dy2 = dy.reshape(rows, d).contiguous()
        dx = torch.empty_like(x2)
        programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(d)
        tile_rows = _tile_rows(block, ROWS_PER_PROGRAM)
        _rms_backward_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_part, rows, d,
                                          X_BF16=_is_bf16(x2.dtype), Y_BF16=_is_bf16(dy.dtype),
                                          ROWS=ROWS_PER_PROGRAM, TILE_ROWS=tile_rows, BLOCK=block,
                                          num_warps=_warps(tile_rows * block))
        dw = dw_part.sum(0) if weight.dtype == torch.float32 else dw_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm_problems(x: Tensor, weight: Tensor) -> list[str]:
    """Why the kernel cannot take these tensors (empty if it can)."""
    problems = []
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype not in (torch.float32, torch.bfloat16):
        problems.append(f"fp32/bf16 only, got x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        problems.append(f"weight of shape ({x.shape[-1]},) expected, got {tuple(weight.shape)}")
    if x.shape[-1] > MAX_COLS:
        problems.append(f"rows of at most {MAX_COLS} elements, got {x.shape[-1]}")
    return problems


def rms_norm(module: nn.Module, x: Tensor, backend: str = "auto") -> Tensor:
    """module's RMSNorm of x: the fused kernel where the backend takes it, else the module class's own forward."""
    if HAVE_TRITON and dispatch.use_triton(backend, (x, module.weight), rms_norm_problems(x, module.weight),
                                           "the fused RMSNorm"):
        return _FusedRMSNorm.apply(x, module.weight, module.variance_epsilon)
    return type(module).forward(module, x)


def is_rms_norm(module: nn.Module) -> bool:
    """transformers' RMSNorm modules (LlamaRMSNorm, Qwen3RMSNorm, ...): a weight and a variance_epsilon."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and \
        isinstance(getattr(module, "weight", None), nn.Parameter)


def fuse_rms_norms(model: nn.Module, backend: str = "auto") -> int:
    """Give every RMSNorm of model the fused forward (same parameters and state_dict). Returns how many."""
    norms = [m for m in model.modules() if is_rms_norm(m)]
    for m in norms:
        m.forward = types.MethodType(lambda self, x: rms_norm(self, x, backend), m)
    return len(norms)

