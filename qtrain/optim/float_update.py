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
the tensor's per-step seed (qtrain.core.seeding.update_seed): the same seed as the reference's generator, another
stream, so the two agree in distribution, not bitwise (as the int8 kernels).

`float_update_` dispatches like qtrain.quant.dispatch: backend "auto" takes the kernel for CUDA tensors it
supports (fp32 or bf16 weight, contiguous, < 2^31 elements), the reference otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.core.seeding import seeded_generator
from qtrain.core.step_state import StepValue, device_form, host_form
from qtrain.optim.base import Update, apply_update_, apply_update_bytes
from qtrain.quant import dispatch
from qtrain.quant.stochastic_round import stochastic_round_to_bf16
from qtrain.quant.triton_kernels import HAVE_TRITON

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
    w_ptr, d_ptr, s_ptr, noise_ptr, numel, n_cols, lr, decay, weight_decay, seed,
    BLOCK: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_WD: tl.constexpr, OUT_BF16: tl.constexpr, SR: tl.constexpr,
    USE_NOISE: tl.constexpr, LR_IS_PTR: tl.constexpr, SEED_IS_PTR: tl.constexpr,
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
    if LR_IS_PTR:  # device scalars (qtrain.core.step_state): a captured graph reads each step's LR and seed
        lr = tl.load(lr).to(tl.float32)  # fp32 or fp64 -> fp32, as a float lr is rounded at launch
        decay = 1.0 - lr * weight_decay  # fp32, as the int8 update kernel with a tensor lr
    w = w - d * lr  # the reference: w.sub_(d * lr), two roundings
    if HAS_WD:
        w = w * decay
    if OUT_BF16:
        if SR:  # stochastic_round_to_bf16: + U{0..2^16-1} on the fp32 bits, low half cleared
            if USE_NOISE:
                noise = tl.load(noise_ptr + offs, mask=mask, other=0).to(tl.uint32)
            else:
                if SEED_IS_PTR:
                    seed = tl.load(seed)
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
def float_update_triton_(weight: Tensor, update: Update, grad: Tensor, lr: float | Tensor, weight_decay: float,
                         seed: int | Tensor | None, noise: Tensor | None = None) -> None:
    """Twin of apply_update_ in one kernel. seed: the SR seed of a bf16 weight (None: round to nearest);
    noise: int32 in [0, 2^16) of the weight's shape to use instead of Philox (tests). lr (fp32) and seed (int64)
    may be 0-d device tensors, read in the kernel: a captured graph then sees each step's values."""
    found = problems(weight, update, grad)
    if found:
        raise ValueError("the float update kernel cannot take this update: " + "; ".join(found))
    lr_is_ptr, seed_is_ptr = isinstance(lr, Tensor), isinstance(seed, Tensor)
    if seed is not None and not seed_is_ptr and not 0 <= seed < 2**31:
        raise ValueError(f"seed = {seed} must be in [0, 2^31); derive it with qtrain.core.seeding.update_seed")
    dense = update.dense is not None
    d = update.dense if dense else grad
    s = d if dense else update.grad_scale.contiguous()  # s is not read for a dense direction
    mode = DENSE if dense else _scale_mode(update.grad_scale, weight)
    n_cols = weight.shape[-1] if weight.dim() else 1
    sr = weight.dtype == torch.bfloat16 and (seed is not None or noise is not None)
    _float_update_kernel[(triton.cdiv(weight.numel(), BLOCK),)](
        weight, d, s, noise if noise is not None else weight, weight.numel(), n_cols, lr if lr_is_ptr else float(lr),
        1.0 if lr_is_ptr else float(1 - lr * weight_decay), float(weight_decay), 0 if seed is None else seed,
        BLOCK=BLOCK, SCALE_MODE=mode, HAS_WD=weight_decay > 0, OUT_BF16=weight.dtype == torch.bfloat16, SR=sr,
        USE_NOISE=noise is not None, LR_IS_PTR=lr_is_ptr, SEED_IS_PTR=seed_is_ptr, num_warps=4,
        enable_fp_fusion=False,
    )


def float_update_(weight: Tensor, update: Update, grad: Tensor, lr: float | StepValue, weight_decay: float,
                  seed: int | StepValue | None, backend: str = "auto") -> None:
    """In place: W <- (W - lr * D) * (1 - lr * weight_decay), a bf16 W rounded stochastically with `seed`
    (None: to nearest). The kernel on CUDA (backend "auto") or forced ("triton"), else apply_update_ with a
    generator seeded by `seed`, the reference (the CPU path, unchanged). StepValues: the kernel reads their
    device tensors, the reference uses their host numbers."""
    if dispatch.use_triton(backend, (weight, grad), problems(weight, update, grad), "the float update"):
        float_update_triton_(weight, update, grad, device_form(lr), weight_decay, device_form(seed))
        return
    seed = host_form(seed)
    generator = seeded_generator(weight.device, seed) if seed is not None else None
    apply_update_(weight, update, grad, host_form(lr), weight_decay, generator)


def float_update_bytes(shape: tuple[int, ...], dtype: torch.dtype, dense: bool, device_type: str,
                       backend: str = "auto") -> int:
    """Transient bytes of `float_update_` beyond its arguments: none where the kernel runs (in place: a CUDA
    fp32 / bf16 weight, backend not "torch"; Triton taken as installed), else apply_update_'s."""
    if device_type == "cuda" and backend != "torch" and dtype in (torch.float32, torch.bfloat16):
        return 0
    return apply_update_bytes(shape, dtype, dtype, dense)


@(triton.jit if HAVE_TRITON else (lambda fn: fn))
def _sr_bf16_kernel(x_ptr, out_ptr, seed_ptr, numel, BLOCK: tl.constexpr):
    """stochastic_round_to_bf16 with the float update's noise: Philox keyed by a device seed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    noise = tl.randint(tl.load(seed_ptr), offs) & 0xFFFF
    bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    tl.store(out_ptr + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)  # exact


def round_to_bf16(x: Tensor, seed: StepValue, backend: str = "auto") -> Tensor:
    """fp32 x (contiguous) -> bf16, rounded stochastically with this step's seed: one kernel reading the device
    seed on CUDA (capturable), else stochastic_round_to_bf16 with a generator seeded by the host number."""
    found = [] if HAVE_TRITON and x.dtype == torch.float32 and x.is_contiguous() else ["needs contiguous fp32"]
    if dispatch.use_triton(backend, (x, seed.device), found, "stochastic rounding to bf16"):
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        _sr_bf16_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, seed.device, x.numel(), BLOCK=BLOCK, num_warps=4)
        return out
    return stochastic_round_to_bf16(x, seeded_generator(x.device, seed.host))

