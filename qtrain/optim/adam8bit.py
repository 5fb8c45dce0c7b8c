"""8-bit Adam for one float matrix (embedding, lm_head) in one kernel that reads the step from the device.

bitsandbytes' Adam8bit takes the LR and the step count as host numbers at every launch (and launches on the
legacy default stream), so a step captured in a CUDA graph would replay the first step's LR and bias
corrections forever. `Adam8bit` keeps the same state (two uint8 moments coded with a dynamic map, one fp32
absmax per block of 256, Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") and the same
update rule, and its kernel reads the LR (`StepState.float_lr`) and the bias corrections (formed from
`StepState.t` on the device once per step) through pointers: a replay sees each step's values.

Per block of 256 elements, in fp32:
    m, v   <- code_m[c_m] * absmax_m, code_v[c_v] * absmax_v          (dequantize)
    m      <- β1 m + (1 - β1) g ;  v <- β2 v + (1 - β2) g²
    w      <- w (1 - lr λ)                                           (decoupled decay, λ > 0 only)
    w      <- w - (lr √(1-β2^t) / (1-β1^t)) · m / (√v + ε √(1-β2^t))   (Adam, bias corrections folded)
    absmax <- max |m|, max v over the block ; c <- index of the nearest code to m / absmax (and v / absmax)
A bf16 weight is rounded to nearest (Adam's steps, ~lr, are far above the bf16 ulp of |w| ~ 0.02).

`adam8bit_update_reference_` is the torch twin (the CPU path, and `[quant] kernels = "torch"`): the same fp32
operations in the same order with the same roundings (the kernel is compiled with enable_fp_fusion=False
and uses IEEE division and square root; the twin takes its square root in fp64), so the two agree bit for bit (tests/test_adam8bit.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qtrain.core.step_state import StepState, StepValue, device_form, host_form
from qtrain.quant import dispatch
from qtrain.quant.triton_kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from qtrain.quant.triton_kernels import _bf16_rne

BLOCK = 256  # elements per absmax (bitsandbytes' block size for its blockwise optimizers)
ROWS = 8  # blocks per program
CHUNK_BLOCKS = 2**14  # the reference works on 4 M elements at a time (bounded fp32 transients)


def dynamic_code(signed: bool) -> Tensor:
    """The 256 sorted values of the dynamic (tree) 8-bit code, in [-1, 1] (signed) or [0, 1].

    Decade e = 0..6 holds values 10^(e-6) x f, f the midpoints of 2^e (signed: each with both signs) or 2^(e+1)
    (unsigned) equal steps of [0.1, 1]: fine steps near zero, where most moments are; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        n = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        values += mids + ([-x for x in mids] if signed else [])
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED_ZERO = dynamic_code(True).tolist().index(0.0)  # the index of 0 in the signed code (127), a host number


def code_midpoints(code: Tensor) -> Tensor:
    """The 255 fp32 midpoints between neighbouring codes, then +inf: index of the nearest code of x = the number
    of midpoints below x."""
    return torch.cat([(code[:-1] + code[1:]) / 2, torch.tensor([float("inf")], device=code.device)])


def step_constants(t: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    """fp32 (2,): [√(1-β2^t) / (1-β1^t), ε √(1-β2^t)] from the device step t, formed in fp64 (as a host
    Adam would) and rounded once."""
    td = t.double()
    c2 = (1 - betas[1] ** td).sqrt()
    return torch.stack([c2 / (1 - betas[0] ** td), eps * c2]).float()


def _quantize(x: Tensor, absmax: Tensor, mids: Tensor) -> Tensor:
    """(B, 256) fp32 values, (B, 1) absmax -> uint8 index of the nearest code of x / absmax (0 where absmax = 0)."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = torch.where(absmax > 0, x / safe, torch.zeros_like(x))
    return torch.searchsorted(mids, scaled).to(torch.uint8)  # the number of midpoints < scaled


def _sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded fp32 square root (the kernel's sqrt_rn). torch's vectorised CPU sqrt of fp32 is
    off by an ulp in ~20 % of values; in fp64, then rounded once to fp32, it is exact (53 >= 2 x 24 + 2 bits)."""
    return x.double().sqrt().float()


@torch.no_grad()
def adam8bit_update_reference_(weight: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float | Tensor,
                               constants: Tensor, betas: tuple[float, float], weight_decay: float) -> None:
    """In place: one 8-bit Adam update of weight (fp32 or bf16) and its state (state1/state2 uint8 codes of
    weight's numel, absmax1/absmax2 fp32 per block, qmap1/qmap2 the codes), in chunks of CHUNK_BLOCKS blocks."""
    n = weight.numel()
    w_flat, g_flat = weight.view(-1), grad.reshape(-1)
    s1, s2 = state["state1"].view(-1), state["state2"].view(-1)
    code1, code2 = state["qmap1"], state["qmap2"]
    mids1, mids2 = code_midpoints(code1), code_midpoints(code2)
    lr32 = torch.as_tensor(lr, dtype=torch.float64).float()  # the kernel rounds the LR to fp32 the same way
    step_size, eps_hat = lr32 * constants[0], constants[1]
    decay = 1.0 - lr32 * weight_decay
    b1, b2 = betas
    nblocks = state["absmax1"].numel()
    for b0 in range(0, nblocks, CHUNK_BLOCKS):
        b1_ = min(b0 + CHUNK_BLOCKS, nblocks)
        lo, hi = b0 * BLOCK, min(b1_ * BLOCK, n)
        rows, pad = b1_ - b0, (b1_ - b0) * BLOCK - (hi - lo)

        def padded(x: Tensor, fill=0) -> Tensor:  # (rows, 256); the tail of the last block padded with fill
            return torch.nn.functional.pad(x, (0, pad), value=fill).view(rows, BLOCK)

        g = padded(g_flat[lo:hi].float())
        a1, a2 = state["absmax1"][b0:b1_, None], state["absmax2"][b0:b1_, None]
        m = code1[padded(s1[lo:hi], SIGNED_ZERO).long()] * a1  # padding: the code of 0
        v = code2[padded(s2[lo:hi]).long()] * a2
        m = m * b1 + g * (1 - b1)
        v = v * b2 + (g * g) * (1 - b2)
        w = padded(w_flat[lo:hi].float())
        if weight_decay > 0:
            w = w * decay
        w = w - step_size * (m / (_sqrt_rn(v) + eps_hat))
        w_flat[lo:hi] = w.view(-1)[: hi - lo].to(weight.dtype)  # bf16: round to nearest even
        new1 = m.abs().amax(dim=1, keepdim=True)
        new2 = v.amax(dim=1, keepdim=True)
        s1[lo:hi] = _quantize(m, new1, mids1).view(-1)[: hi - lo]
        s2[lo:hi] = _quantize(v, new2, mids2).view(-1)[: hi - lo]
        a1.copy_(new1)
        a2.copy_(new2)


if HAVE_TRITON:

    @triton.jit
    def _nearest_code(x, mids_ptr):
        """Index of the nearest code: the number of midpoints below x (binary lifting over 256 entries)."""
        pos = tl.zeros(x.shape, dtype=tl.int32)
        for k in tl.static_range(8):
            step = 128 >> k
            below = tl.load(mids_ptr + pos + step - 1) < x
            pos = tl.where(below, pos + step, pos)
        return pos

    @triton.jit
    def _adam8bit_kernel(w_ptr, g_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, code1_ptr, code2_ptr, mids1_ptr, mids2_ptr,
                         lr_ptr, k_ptr, numel, nblocks, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         weight_decay, ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_WD: tl.constexpr,
                         OUT_BF16: tl.constexpr):
        blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        offs = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK)
        mask = offs < numel
        bmask = blocks < nblocks
        lr = tl.load(lr_ptr).to(tl.float32)  # fp64 -> fp32: the step's LR (qtrain.core.step_state)
        step_size = lr * tl.load(k_ptr)
        eps_hat = tl.load(k_ptr + 1)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a1 = tl.load(a1_ptr + blocks, mask=bmask, other=0.0)
        a2 = tl.load(a2_ptr + blocks, mask=bmask, other=0.0)
        c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.where(mask, tl.load(code1_ptr + c1) * a1[:, None], 0.0)
        v = tl.where(mask, tl.load(code2_ptr + c2) * a2[:, None], 0.0)
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WD:
            w = w * (1.0 - lr * weight_decay)
        w = w - step_size * tl.math.div_rn(m, tl.math.sqrt_rn(v) + eps_hat)
        if OUT_BF16:
            w = _bf16_rne(w)  # nearest even, as the reference's .to(bfloat16) (the interpreter's cast truncates)
        tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)
        new1 = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
        new2 = tl.max(tl.where(mask, v, 0.0), axis=1)
        x1 = tl.where(new1[:, None] > 0, tl.math.div_rn(m, tl.where(new1 > 0, new1, 1.0)[:, None]), 0.0)
        x2 = tl.where(new2[:, None] > 0, tl.math.div_rn(v, tl.where(new2 > 0, new2, 1.0)[:, None]), 0.0)
        tl.store(s1_ptr + offs, _nearest_code(x1, mids1_ptr).to(tl.uint8), mask=mask)
        tl.store(s2_ptr + offs, _nearest_code(x2, mids2_ptr).to(tl.uint8), mask=mask)
        tl.store(a1_ptr + blocks, new1, mask=bmask)
        tl.store(a2_ptr + blocks, new2, mask=bmask)


def problems(weight: Tensor, grad: Tensor) -> list[str]:
    """Why the kernel cannot take this update (the reference takes any)."""
    out = [] if HAVE_TRITON else ["triton is not installed"]
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous():
        out.append(f"the weight must be contiguous fp32 or bf16, got {weight.dtype}")
    if grad.shape != weight.shape or not grad.is_contiguous():
        out.append(f"the gradient must be contiguous of the weight's shape, got {tuple(grad.shape)}")
    if weight.numel() >= 2**31 - BLOCK * ROWS:
        out.append("a weight with >= 2^31 elements (the kernel indexes with int32)")
    return out


@torch.no_grad()
def adam8bit_update_triton_(weight: Tensor, grad: Tensor, state: dict[str, Tensor], lr: Tensor, constants: Tensor,
                            betas: tuple[float, float], weight_decay: float,
                            mids: tuple[Tensor, Tensor] | None = None) -> None:
    """Twin of adam8bit_update_reference_ in one launch; lr (fp64 0-d) and constants read on the device.
    mids: code_midpoints of qmap1 and qmap2 when the caller keeps them (else formed here: 6 more launches)."""
    found = problems(weight, grad)
    if found:
        raise ValueError("the 8-bit Adam kernel cannot take this update: " + "; ".join(found))
    nblocks = state["absmax1"].numel()
    b1, b2 = betas
    mids1, mids2 = mids if mids is not None else (code_midpoints(state["qmap1"]), code_midpoints(state["qmap2"]))
    _adam8bit_kernel[(triton.cdiv(nblocks, ROWS),)](
        weight, grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"], state["qmap1"],
        state["qmap2"], mids1, mids2, lr, constants,
        weight.numel(), nblocks, b1, 1 - b1, b2, 1 - b2, float(weight_decay), ROWS=ROWS, BLOCK=BLOCK,
        HAS_WD=weight_decay > 0, OUT_BF16=weight.dtype == torch.bfloat16, num_warps=4, enable_fp_fusion=False)


def adam8bit_update_(weight: Tensor, grad: Tensor, state: dict[str, Tensor], lr: StepValue, constants: Tensor,
                     betas: tuple[float, float], weight_decay: float, backend: str = "auto",
                     mids: tuple[Tensor, Tensor] | None = None) -> None:
    """The kernel on CUDA (backend "auto") or forced ("triton"), else the reference."""
    if dispatch.use_triton(backend, (weight, grad), problems(weight, grad), "the 8-bit Adam update"):
        adam8bit_update_triton_(weight, grad, state, device_form(lr), constants, betas, weight_decay, mids)
    else:
        adam8bit_update_reference_(weight, grad, state, host_form(lr), constants, betas, weight_decay)


def init_state(weight: Tensor) -> dict[str, Tensor]:
    """Zero moments: state1 at the code of 0, state2 at index 0 (= 0), absmax 0 (dequantizes to 0 anyway)."""
    nblocks = -(-weight.numel() // BLOCK)
    code1, code2 = dynamic_code(True).to(weight.device), dynamic_code(False).to(weight.device)
    return {"state1": torch.full(weight.shape, SIGNED_ZERO, dtype=torch.uint8, device=weight.device),
            "state2": torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device),
            "absmax1": torch.zeros(nblocks, dtype=torch.float32, device=weight.device),
            "absmax2": torch.zeros(nblocks, dtype=torch.float32, device=weight.device),
            "qmap1": code1, "qmap2": code2}


class Adam8bit:
    """8-bit Adam over one float tensor, stepped with the values of the `clock`'s step (float_lr, t): the
    interface of a torch optimizer over [param] (state, param_groups, step, state_dict in bitsandbytes' format:
    state1/state2/absmax1/absmax2/qmap1/qmap2/step), so the Updater steps it like one."""

    STATE_LABEL = "Adam 8-bit (qtrain, capturable)"

    def __init__(self, param: nn.Parameter, clock: StepState, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, kernels: str = "auto"):
        self.param, self.clock, self.kernels = param, clock, kernels
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.moments = init_state(param)
        self.mids = (code_midpoints(self.moments["qmap1"]), code_midpoints(self.moments["qmap2"]))  # ours, fixed
        self.param_groups = [{"params": [param], "lr": 0.0, "betas": self.betas, "eps": eps,
                              "weight_decay": weight_decay}]

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:
        return {self.param: self.moments}

    @torch.no_grad()
    def step(self) -> None:
        """One update from param.grad with this step's LR and t, both read on the device by the kernel."""
        constants = self.clock.derived(("adam8bit", self.betas, self.eps),
                                       lambda t: step_constants(t, self.betas, self.eps))
        adam8bit_update_(self.param.detach(), self.param.grad, self.moments, self.clock.float_lr_value, constants,
                         self.betas, self.weight_decay, self.kernels, self.mids)

    def state_dict(self) -> dict[str, Any]:
        state = {0: {"step": self.clock.host_t, **self.moments}} if self.clock.host_t else {}
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**hyper, "params": [0]}]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Its own state, or bitsandbytes Adam8bit's (moments re-coded by value if its code maps differ)."""
        st = next(iter(sd["state"].values()), None)
        if st is not None and "__bnb_optimizer_quant_state__" in st:  # bitsandbytes >= 0.48 nests its tensors
            st = {k: v for k, v in st.items() if k != "__bnb_optimizer_quant_state__"} | st["__bnb_optimizer_quant_state__"]
        fresh = init_state(self.param)
        if st is None:
            self.moments.update(fresh)
            return
        device = self.param.device
        for i, signed in ((1, True), (2, False)):
            codes, absmax, qmap = (st[f"{k}{i}"].to(device) for k in ("state", "absmax", "qmap"))
            if codes.dtype != torch.uint8 or absmax.numel() != fresh[f"absmax{i}"].numel():
                raise ValueError(f"an 8-bit Adam state of {tuple(codes.shape)} {codes.dtype} with "
                                 f"{absmax.numel()} blocks does not fit a tensor of {tuple(self.param.shape)}")
            if torch.equal(qmap.float(), fresh[f"qmap{i}"]):
                self.moments[f"state{i}"] = codes.reshape(self.param.shape).clone()
                self.moments[f"absmax{i}"] = absmax.float().clone()
            else:  # another code map: decode, then code with ours (by value, same absmax)
                n = codes.numel()
                vals = qmap.float()[codes.reshape(-1).long()]
                vals = torch.nn.functional.pad(vals, (0, absmax.numel() * BLOCK - n)).view(-1, BLOCK)
                a = absmax.float().view(-1, 1)
                mids = code_midpoints(fresh[f"qmap{i}"])
                self.moments[f"state{i}"] = _quantize(vals * a, a, mids).view(-1)[:n].reshape(self.param.shape)
                self.moments[f"absmax{i}"] = absmax.float().clone()
            self.moments[f"qmap{i}"] = fresh[f"qmap{i}"]
