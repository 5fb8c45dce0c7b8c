"""The update of a float weight (embedding, lm_head, float projections) in one kernel: W <- (W - lr*D) * decay.

`optim.base.apply_update_` is the torch reference: per chunk of rows it forms D in fp32 (the dense direction,
or the gradient times APOLLO's scale), subtracts lr*D from an fp32 copy of the weight, applies the decoupled
decay and writes back, for a bf16 weight with stochastic rounding. That is ~10 launches per 4 M-element chunk:
~640 per step for the bf16 32000 x 4096 embedding and lm_head of `7b-8gb`. `_float_update_kernel` does it in
one launch and one pass, in place, with no fp32 transient.

Bit-identical to the reference given the same random bits (tests/test_float_update.py, in Triton's
interpreter): the same fp32 operations with the same roundings (`t = D * lr`, `w - t`, `w * decay`, launched
with enable_fp_fusion=False so nothing is contracted into an FMA), the same stochastic rounding to bf16 (add
16 random low bits to the fp32 pattern, clear them: stochastic_round.stochastic_round_to_bf16), and
nearest-even rounding of a bf16 weight without SR done on the bits. The random bits come from Philox keyed by
the tensor's per-step seed (qtrain.seeding.update_seed): the same seed as the reference's generator, another
stream, so the two agree in distribution, not bitwise (as the int8 kernels).

`float_update_` dispatches like qtrain.quant.dispatch: backend "auto" takes the kernel for CUDA tensors it
supports (fp32 or bf16 weight, contiguous, < 2^31 elements), the reference otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.optim.base import Update, apply_update_
from qtrain.quant import dispatch
from qtrain.quant.triton_kernels import HAVE_TRITON
from qtrain.seeding import seeded_generator

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from qtrain.quant.triton_kernels import _bf16_rne

BLOCK = 2048  # elements per program (16 per thread at 4 warps)
DENSE, SCALE_SCALAR, SCALE_PER_COL, SCALE_PER_ROW = -1, 0, 1, 2


def _jit(fn):
    return triton.jit(fn, do_not_specialize=["seed"]) if HAVE_TRITON else fn


@_jit
def _float_update_kernel(
    w_ptr, d_ptr, s_ptr, noise_ptr, numel, n_cols, lr, decay, seed,
    BLOCK: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_WD: tl.constexpr, OUT_BF16: tl.constexpr, SR: tl.constexpr,
    USE_NOISE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALE_MODE == 0:  # SCALE_SCALAR, SCALE_PER_COL, SCALE_PER_ROW; -1: d is the dense direction
        d = d * tl.load(s_ptr).to(tl.float32)
    elif SCALE_MODE == 1:
        d = d * tl.load(s_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    elif SCALE_MODE == 2:
        d = d * tl.load(s_ptr + offs // n_cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w - d * lr  # the reference: w.sub_(d * lr), two roundings
    if HAS_WD:
        w = w * decay
    if OUT_BF16:
        if SR:  # stochastic_round_to_bf16: + U{0..2^16-1} on the fp32 bits, low half cleared
            if USE_NOISE:
                noise = tl.load(noise_ptr + offs, mask=mask, other=0).to(tl.uint32)
            else:
                noise = tl.randint(seed, offs) & 0xFFFF
            bits = (w.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
            w = bits.to(tl.float32, bitcast=True)  # exactly a bf16 value: the cast below is exact
        else:
            w = tl.where(w == w, _bf16_rne(w), w)  # nearest even (the interpreter's cast truncates); NaN stays
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)


def problems(weight: Tensor, update: Update, grad: Tensor) -> list[str]:
    """Why the kernel cannot take this update (the reference takes any)."""
    out = []
    if not HAVE_TRITON:
        out.append("triton is not installed")
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous():
        out.append(f"the weight must be contiguous fp32 or bf16, got {weight.dtype}")
    d = update.dense if update.dense is not None else grad
    if d.shape != weight.shape or not d.is_contiguous() or d.dtype not in (torch.float32, torch.bfloat16,
                                                                            torch.float16):
        out.append(f"the direction must be a contiguous float tensor of the weight's shape, got {d.dtype} "
                   f"{tuple(d.shape)}")
    if update.dense is None and _scale_mode(update.grad_scale, weight) is None:
        out.append(f"grad_scale of shape {tuple(update.grad_scale.shape)} must be (), (1, n) or (m, 1)")
    if weight.numel() >= 2**31:
        out.append("a weight with >= 2^31 elements (the kernel indexes with int32)")
    return out


def _scale_mode(s: Tensor, weight: Tensor) -> int | None:
    if s.numel() == 1:
        return SCALE_SCALAR
    if weight.dim() == 2 and s.shape == (1, weight.shape[1]):
        return SCALE_PER_COL
    if weight.dim() == 2 and s.shape == (weight.shape[0], 1):
        return SCALE_PER_ROW
    return None


@torch.no_grad()
def float_update_triton_(weight: Tensor, update: Update, grad: Tensor, lr: float, weight_decay: float,
                         seed: int | None, noise: Tensor | None = None) -> None:
    """Twin of apply_update_ in one kernel. seed: the SR seed of a bf16 weight (None: round to nearest);
    noise: int32 in [0, 2^16) of the weight's shape to use instead of Philox (tests)."""
    found = problems(weight, update, grad)
    if found:
        raise ValueError("the float update kernel cannot take this update: " + "; ".join(found))
    if seed is not None and not 0 <= seed < 2**31:
        raise ValueError(f"seed = {seed} must be in [0, 2^31); derive it with qtrain.seeding.update_seed")
    dense = update.dense is not None
    d = update.dense if dense else grad
    s = d if dense else update.grad_scale.contiguous()  # s is not read for a dense direction
    mode = DENSE if dense else _scale_mode(update.grad_scale, weight)
    n_cols = weight.shape[-1] if weight.dim() else 1
    sr = weight.dtype == torch.bfloat16 and (seed is not None or noise is not None)
    _float_update_kernel[(triton.cdiv(weight.numel(), BLOCK),)](
        weight, d, s, noise if noise is not None else weight, weight.numel(), n_cols, float(lr),
        float(1 - lr * weight_decay), seed or 0,
        BLOCK=BLOCK, SCALE_MODE=mode, HAS_WD=weight_decay > 0, OUT_BF16=weight.dtype == torch.bfloat16, SR=sr,
        USE_NOISE=noise is not None, num_warps=4, enable_fp_fusion=False,
    )


def float_update_(weight: Tensor, update: Update, grad: Tensor, lr: float, weight_decay: float, seed: int | None,
                  backend: str = "auto") -> None:
    """In place: W <- (W - lr * D) * (1 - lr * weight_decay), a bf16 W rounded stochastically with `seed`
    (None: to nearest). The kernel on CUDA (backend "auto") or forced ("triton"), else apply_update_ with a
    generator seeded by `seed`, the reference (the CPU path, unchanged)."""
    if dispatch.use_triton(backend, (weight, grad), problems(weight, update, grad), "the float update"):
        float_update_triton_(weight, update, grad, lr, weight_decay, seed)
        return
    generator = seeded_generator(weight.device, seed) if seed is not None else None
    apply_update_(weight, update, grad, lr, weight_decay, generator)
