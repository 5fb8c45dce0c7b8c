"""Triton twins of the int8 weight kernels: dequantize, and the fused scaled update with stochastic rounding.

Each kernel matches a plain-torch reference of the same signature (groupwise.dequantize_groupwise and
int8_update.int8_scaled_update_) bit for bit, given the same uniforms: the same fp32 operations in the
same order and with the same roundings. Three things make that hold on a GPU:
  - launches pass enable_fp_fusion=False: `c * scale + offset` compiled to one FMA rounds once where
    torch rounds twice (torch runs each op as its own kernel, so it never contracts); where the
    reference does fuse (addcmul_), the kernel calls tl.fma explicitly;
  - divisions use tl.math.div_rn (IEEE round-to-nearest), as torch's `/` does;
  - fp32 -> bf16 is rounded to nearest-even by integer arithmetic on the bits; Triton's interpreter
    (TRITON_INTERPRET=1, which the CPU tests use) truncates in its native cast, GPUs round to nearest.
The interpreter reproduces the references exactly from Triton 3.9 on; earlier interpreters emulate
tl.fma as a multiply and an add (two roundings), so the same-uniform tests then miss by one ulp.

Layout (groupwise.py): codes uint8 (m, n), groups of g consecutive elements of the row-major flattening
(they straddle rows when n % g != 0), scale/offset (G,) fp32 or bf16, w = codes * scale + offset.
Each program handles BLOCK_G whole groups as a (BLOCK_G, g) tile, so the per-group min/max of the update
kernel is a register reduction: one read and one write of the codes, no atomics, no second pass.

Importable without Triton (HAVE_TRITON = False); the dispatcher in dispatch.py then uses the references.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant.groupwise import CODE_MAX, MIN_RANGE, num_groups

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    HAVE_TRITON = True
    # kernels may only read globals that are constexpr
    _CODE_MAX = tl.constexpr(float(CODE_MAX))
    _MIN_RANGE = tl.constexpr(MIN_RANGE)
    _BF16_TINY = tl.constexpr(2.0**-133)  # smallest positive bf16 (subnormal)
except ImportError:  # the torch references serve CPU-only installs
    HAVE_TRITON = False

TILE_ELEMS = 2048  # elements per program: 16 groups of 128, 16 per thread at 4 warps (16-byte code loads)
NUM_WARPS = 4
SCALE_SCALAR, SCALE_PER_COL, SCALE_PER_ROW = 0, 1, 2  # grad_scale of shape (), (1, n), (m, 1)
META_DTYPES = (torch.float32, torch.bfloat16)  # group scale/offset storage (groupwise._round_meta)


def _jit(**options):
    """triton.jit(**options); without Triton the kernels stay plain functions that are never launched."""
    return (lambda fn: triton.jit(fn, **options)) if HAVE_TRITON else (lambda fn: fn)


def interpret_mode() -> bool:
    """True when the kernels run in Triton's CPU interpreter.

    Decided once per process: triton.jit reads TRITON_INTERPRET when it wraps a function, and Triton's own
    library kernels (tl.rand4x) are wrapped when triton is imported, so the variable must be set before
    the first `import triton`; setting it later has no effect.
    """
    return HAVE_TRITON and isinstance(_update_kernel, InterpretedFunction)


def weight_problems(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, need_triton: bool = True
                    ) -> list[str]:
    """What keeps every Triton int8 kernel (these and triton_matmul's) from taking this weight: triton
    missing, codes not contiguous uint8 (m, n), group metadata of the wrong dtype or shape, int32 overflow.
    The group-size rule is each kernel's own."""
    G = num_groups(codes.shape, group_size)
    problems = []
    if need_triton and not HAVE_TRITON:  # need_triton=False: the layout alone (dispatch.plan)
        problems.append("triton is not installed (pip install triton)")
    if codes.dtype != torch.uint8 or codes.dim() != 2 or not codes.is_contiguous():
        problems.append(f"codes must be contiguous uint8 (m, n), got {codes.dtype} {tuple(codes.shape)}")
    for name, t in (("scale", scale), ("offset", offset)):
        if t.dtype not in META_DTYPES or t.shape != (G,) or not t.is_contiguous():
            problems.append(f"{name} must be contiguous fp32 or bf16 of shape ({G},), got {t.dtype} {tuple(t.shape)}")
    if scale.dtype != offset.dtype:
        problems.append(f"scale and offset dtypes differ ({scale.dtype}, {offset.dtype})")
    if codes.numel() >= 2**31:
        problems.append(f"{codes.numel()} elements >= 2^31 (the kernels index with int32)")
    return problems


def int8_kernel_problems(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, need_triton: bool = True
                         ) -> list[str]:
    """Why these kernels cannot take this weight (empty if they can)."""
    problems = weight_problems(codes, scale, offset, group_size, need_triton)
    if group_size < 8 or group_size & (group_size - 1):
        problems.append(f"group size {group_size} must be a power of two >= 8 (tiles; 8 uniforms per Philox draw)")
    return problems


def check_supported(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> None:
    """Raise ValueError if the Triton kernels cannot take these tensors (the torch references can)."""
    problems = int8_kernel_problems(codes, scale, offset, group_size)
    if problems:
        raise ValueError(
            "the Triton int8 kernels cannot handle this weight: " + "; ".join(problems)
            + ". Use backend='torch'."
        )


# ---------------------------------------------------------------------------------------------------
# dequantize


@_jit()
def _dequantize_kernel(
    codes_ptr, scale_ptr, offset_ptr, out_ptr, num_groups,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, OUT_BF16: tl.constexpr,
):
    gid = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,) group indices
    gmask = gid < num_groups
    flat = gid[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (BLOCK_G, GROUP) row-major element index
    mask = gmask[:, None]
    c = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.float32)
    sc = tl.load(scale_ptr + gid, mask=gmask, other=0.0).to(tl.float32)  # bf16 metadata widens exactly
    off = tl.load(offset_ptr + gid, mask=gmask, other=0.0).to(tl.float32)
    w = c * sc[:, None] + off[:, None]  # fp32, rounded after * and after + (no FMA: see module docstring)
    if OUT_BF16:  # fp32 -> bf16 round to nearest even on the bits (the interpreter's cast truncates)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        w = tl.where(w == w, bits.to(tl.float32, bitcast=True), w)  # NaN stays NaN
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(
    codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, dtype: torch.dtype = torch.float32, *,
    checked: bool = False,
) -> Tensor:
    """Twin of groupwise.dequantize_groupwise: codes uint8 (m, n), scale/offset fp32 (G,) -> (m, n) dtype.

    Bit-exact with the reference for dtype in {fp32, bf16, fp16}. checked: the caller ran check_supported
    (dispatch does, once per launch).
    """
    if not checked:
        check_supported(codes, scale, offset, group_size)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize_triton writes fp32, bf16 or fp16, got {dtype}")
    G = scale.numel()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    block_g = max(1, TILE_ELEMS // group_size)
    _dequantize_kernel[(triton.cdiv(G, block_g),)](
        codes, scale, offset, out, G,
        GROUP=group_size, BLOCK_G=block_g, OUT_BF16=dtype == torch.bfloat16,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# fused update: dequantize -> W - lr*s*G -> decay -> fresh group ranges -> SR -> codes, scale, offset


@_jit()
def _bf16_rne(x):
    """fp32 -> the nearest bf16 value (ties to even), returned as fp32 with the low 16 bits zero."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)


@_jit()
def _bf16_next_down(x):
    """torch.nextafter(x, -inf) for a bf16 value x held in fp32 (one bf16 ulp toward -inf)."""
    bits = x.to(tl.uint32, bitcast=True)
    step = tl.where(x > 0, bits - 0x10000, bits + 0x10000)  # negative: a larger magnitude
    return tl.where(x == 0, -_BF16_TINY, step.to(tl.float32, bitcast=True))  # ±0 -> -(smallest subnormal)


@_jit()
def _bf16_next_up(x):
    """torch.nextafter(x, +inf) for a positive bf16 value x held in fp32."""
    return (x.to(tl.uint32, bitcast=True) + 0x10000).to(tl.float32, bitcast=True)


@_jit(do_not_specialize=["seed"])  # a new seed every step must not trigger a recompilation
def _update_kernel(
    codes_ptr, scale_ptr, offset_ptr, grad_ptr, s_ptr, lr, decay, weight_decay, uniform_ptr, seed,
    num_groups, n_cols,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SCALE_MODE: tl.constexpr, LR_IS_PTR: tl.constexpr,
    HAS_WD: tl.constexpr, USE_UNIFORM: tl.constexpr, META_BF16: tl.constexpr, SEED_IS_PTR: tl.constexpr,
):
    gid = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
    gmask = gid < num_groups
    flat = gid[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (BLOCK_G, GROUP)
    mask = gmask[:, None]

    # dequantize (fp32, two roundings)
    c = tl.load(codes_ptr + flat, mask=mask, other=0).to(tl.float32)
    sc = tl.load(scale_ptr + gid, mask=gmask, other=0.0).to(tl.float32)
    off = tl.load(offset_ptr + gid, mask=gmask, other=0.0).to(tl.float32)
    w = c * sc[:, None] + off[:, None]

    # W <- W + G * (s * -lr) with one rounding, as the reference's addcmul_ (torch >= 2.x computes it with
    # std::fma on CPU and CUDA); s per tensor, column or row (flat -> row, col)
    g = tl.load(grad_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    if SCALE_MODE == 0:  # SCALE_SCALAR, SCALE_PER_COL, SCALE_PER_ROW (kernels read no plain globals)
        s = tl.load(s_ptr).to(tl.float32)
    elif SCALE_MODE == 1:
        s = tl.load(s_ptr + flat % n_cols, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + flat // n_cols, mask=mask, other=0.0).to(tl.float32)
    if LR_IS_PTR:  # a 0-dim device tensor, read here: no host sync for a scheduled lr
        lr_val = tl.load(lr).to(tl.float32)
    else:
        lr_val = lr
    w = tl.fma(g, s * -lr_val, w)  # explicit fma: emitted whatever enable_fp_fusion says
    if HAS_WD:  # decoupled decay after the step; with a tensor lr, 1 - lr*wd is formed in fp32 like torch
        if LR_IS_PTR:
            decay = 1.0 - lr_val * weight_decay
        w = w * decay

    # fresh per-group range (groupwise.group_ranges): offset = min, scale = range / 255; for bf16 metadata
    # the offset is rounded down and the scale up (groupwise._round_meta), so no value leaves [0, 255]
    lo = tl.min(w, axis=1)  # (BLOCK_G,); padding groups loaded zeros, so they stay finite (and unstored)
    hi = tl.max(w, axis=1)
    if META_BF16:
        off_new = _bf16_rne(lo)
        off_new = tl.where(off_new > lo, _bf16_next_down(off_new), off_new)
        new_scale = _bf16_rne(tl.math.div_rn(tl.maximum(hi - off_new, _MIN_RANGE), _CODE_MAX))
        new_scale = tl.where(new_scale * _CODE_MAX + off_new < hi, _bf16_next_up(new_scale), new_scale)
    else:
        off_new = lo
        new_scale = tl.math.div_rn(tl.maximum(hi - lo, _MIN_RANGE), _CODE_MAX)
    # continuous code position in [0, 255]: one correctly rounded reciprocal per group and a multiply per
    # element (a per-element div_rn was ~10 instructions), exactly as the reference's reciprocal() and mul_
    inv_scale = tl.math.div_rn(1.0, new_scale)
    v = (w - off_new[:, None]) * inv_scale[:, None]

    # SR: floor(v) + [u < frac(v)], u from the caller (tests) or Philox4x32-10 keyed by seed, 16-bit uniforms
    # (stochastic_round.sr_uniforms' lattice (k + 1/2)·2⁻¹⁶): element i takes the 16-bit half i % 2 (low
    # first) of word (i % 8) // 2 of counter i // 8, so one Philox evaluation serves 8 elements, not 4
    if USE_UNIFORM:
        u = tl.load(uniform_ptr + flat, mask=mask, other=0.0)
    else:
        octet = gid[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]  # (BLOCK_G, GROUP/8)
        if SEED_IS_PTR:  # an int64 device scalar (qtrain.core.step_state): a captured graph reads each step's seed
            seed = tl.load(seed)
        r0, r1, r2, r3 = tl.randint4x(seed, octet)
        # tl.join appends the fastest axis: (q, j1, j0, half) flattens to element 8q + 2(2·j1 + j0) + half
        lo = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
        hi = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
        k = tl.reshape(tl.join(lo, hi), (BLOCK_G, GROUP))
        u = (k.to(tl.float32) + 0.5) * 0.0000152587890625  # (k + 1/2)·2⁻¹⁶, both steps exact
    lower = tl.floor(v)
    q = lower + (u < v - lower).to(tl.float32)
    q = tl.minimum(tl.maximum(q, 0.0), _CODE_MAX)
    tl.store(codes_ptr + flat, q.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + gid, new_scale.to(scale_ptr.dtype.element_ty), mask=gmask)  # exact: already on the grid
    tl.store(offset_ptr + gid, off_new.to(offset_ptr.dtype.element_ty), mask=gmask)


def _scale_mode(grad_scale: Tensor, shape: tuple[int, int]) -> int:
    m, n = shape
    if grad_scale.numel() == 1:
        return SCALE_SCALAR
    if grad_scale.shape == (1, n):
        return SCALE_PER_COL
    if grad_scale.shape == (m, 1):
        return SCALE_PER_ROW
    raise ValueError(f"grad_scale of shape {tuple(grad_scale.shape)} must be (), (1, {n}) or ({m}, 1)")


@torch.no_grad()
def int8_scaled_update_triton_(
    codes: Tensor,
    scale: Tensor,
    offset: Tensor,
    group_size: int,
    grad: Tensor,
    grad_scale: Tensor,
    lr: float | Tensor,
    weight_decay: float,
    seed: int | Tensor,
    uniform: Tensor | None = None,
    *,
    checked: bool = False,
) -> None:
    """Twin of int8_update.int8_scaled_update_: W <- SR((W - lr * grad_scale * grad) * (1 - lr * wd)).

    One kernel, one pass over the weight. codes uint8 (m, n), scale/offset fp32 (G,), updated in place.
    grad (m, n) fp32/bf16/fp16; grad_scale fp32 of shape (), (1, n) or (m, 1); lr a float or a 0-dim
    tensor on the weight's device (read in the kernel: no host sync). seed in [0, 2^31), a host int or an int64
    0-d tensor on the weight's device (read in the kernel, like a tensor lr: capturable): Philox key; the
    uniform of flat element i is (k + 1/2)·2⁻¹⁶ with k the 16-bit half i % 2 (low first) of word (i % 8) // 2
    of tl.randint4x(seed, i // 8), so a (seed, shape) pair reproduces bitwise and nothing of size m*n is
    materialised. uniform: (m, n) fp32 in [0, 1) to use instead (tests; stochastic_round.sr_uniforms draws
    the reference's on the same lattice). Same uniforms as the reference => identical codes, scale and offset.
    checked: the caller ran check_supported (dispatch does, once per launch).
    """
    if not checked:
        check_supported(codes, scale, offset, group_size)
    m, n = codes.shape
    G = scale.numel()
    if grad.shape != codes.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != weight shape {(m, n)}")
    others = [grad, grad_scale, scale, offset] + [t for t in (lr, uniform, seed) if isinstance(t, Tensor)]
    if any(t.device != codes.device for t in others):  # a kernel cannot read another device's memory
        devices = sorted({str(t.device) for t in others})
        raise ValueError(f"all tensors must be on the weight's device {codes.device}, got {devices}")
    seed_is_ptr = isinstance(seed, Tensor)
    if seed_is_ptr and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"a tensor seed must be one int64, got {seed.dtype} {tuple(seed.shape)}")
    if not seed_is_ptr and not 0 <= seed < 2**31:
        raise ValueError(f"seed = {seed} must be in [0, 2^31); derive it with qtrain.core.seeding.update_seed")
    mode = _scale_mode(grad_scale, (m, n))
    lr_is_ptr = isinstance(lr, Tensor)
    if lr_is_ptr and lr.numel() != 1:
        raise ValueError(f"a tensor lr must hold one value, got shape {tuple(lr.shape)}")
    # python lr: 1 - lr*wd in fp64 here, rounded to fp32 at launch, as torch's mul_ by a python float
    decay = 1.0 - lr * weight_decay if not lr_is_ptr else 1.0
    if uniform is not None and uniform.shape != codes.shape:
        raise ValueError(f"uniform shape {tuple(uniform.shape)} != weight shape {(m, n)}")
    block_g = max(1, TILE_ELEMS // group_size)
    _update_kernel[(triton.cdiv(G, block_g),)](
        codes, scale, offset, grad.contiguous(), grad_scale.contiguous(),  # no-ops for autograd's grads
        lr if lr_is_ptr else float(lr), float(decay), float(weight_decay),
        None if uniform is None else uniform.float().contiguous(), seed, G, n,
        GROUP=group_size, BLOCK_G=block_g, SCALE_MODE=mode, LR_IS_PTR=lr_is_ptr,
        HAS_WD=weight_decay > 0, USE_UNIFORM=uniform is not None, META_BF16=scale.dtype == torch.bfloat16,
        SEED_IS_PTR=seed_is_ptr, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
