"""Peak memory of one training step of a recipe, predicted before it runs (`qtrain estimate`).

Persistent bytes are not computed from formulas: the model is built with `build_model` on the meta
device, the updater with `build_updater`, every method state is created by the method's own
`init_state` (through `Updater._method_state`) and every float optimizer takes one real step on meta
tensors so bitsandbytes / torch allocate their lazy state there; the estimator sums the `nbytes`.
Only what exists during a step is modelled: saved activations (one function, `activation_bytes`, with
its derivation) and the transients of the update code paths (`*_peak` functions, each naming the
lines it models). A step is a sequence of phases (forward, loss, lm_head update, block backward,
embedding update, and for release = false the updates after backward); the peak is the persistent
bytes plus the largest phase.

    from qtrain.estimate import estimate
    b = estimate("recipes/7b.toml")              # or a TrainConfig; device_type="cpu" for CPU runs
    print(b.peak_allocated / 2**30, b.peak_component)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtrain.config import TrainConfig
from qtrain.model import META_DTYPES, build_model
from qtrain.optim.alice import AliceMethod
from qtrain.optim.apollo import Apollo, project_with_column_norms
from qtrain.optim.apollo_svd import ApolloSVDMethod
from qtrain.optim.base import apply_update_
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.stochastic_round import rows_per_chunk
from qtrain.train import autocast_dtype, build_updater

GiB = 2**30
MiB = 2**20
F32 = torch.float32.itemsize
META = torch.device("meta")

# Chunk limits of the chunked code paths, read from their signatures (never a copied literal).
INT8_CHUNK = inspect.signature(int8_scaled_update_).parameters["max_chunk_elems"].default
APPLY_CHUNK = inspect.signature(apply_update_).parameters["max_chunk_elems"].default
APOLLO_CHUNK = inspect.signature(project_with_column_norms).parameters["max_chunk_elems"].default

# Outside torch.cuda.max_memory_allocated, not measurable here: assumptions to calibrate with
# tools/validate_estimator.py on a GPU (it prints the measured context and reserved/allocated ratio).
CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context + cuBLAS/cuDNN handles of a torch 2.x process (nvidia-smi)
ALLOCATOR_SLACK = 0.05  # caching-allocator blocks freed by transients but not reusable for the next size


@dataclass
class Component:
    """One line of the breakdown: bytes and the code whose memory it is."""

    name: str
    bytes: int
    kind: str  # "persistent" | "activation" | "transient" | "overhead"
    code_path: str


@dataclass
class Phase:
    """A moment of the step: the non-persistent components alive then (name -> bytes)."""

    name: str
    parts: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


@dataclass
class Breakdown:
    """Predicted memory of one training step of `recipe` on `device_type`."""

    recipe: str
    device_type: str
    compute_dtype: str
    components: list[Component]
    phases: list[Phase]
    persistent_bytes: int
    peak_allocated: int  # torch.cuda.max_memory_allocated (CPU: the profiler's live peak)
    peak_reserved: int  # torch.cuda.max_memory_reserved
    total_on_gpu: int  # peak_reserved + CUDA context (what nvidia-smi shows)
    peak_phase: str
    peak_component: str  # the largest non-persistent component alive in the peak phase
    largest_component: str
    notes: list[str] = field(default_factory=list)

    def component(self, name_prefix: str) -> Component:
        return next(c for c in self.components if c.name.startswith(name_prefix))

    def bytes_of(self, kind: str) -> int:
        return sum(c.bytes for c in self.components if c.kind == kind)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p, phase in zip(d["phases"], self.phases):
            p["bytes"] = phase.bytes
        return d


# ---- persistent bytes: real constructors on the meta device ------------------------------------------
def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _nbytes(tensors, device_type: str) -> int:
    """Bytes of distinct tensors that live on the training device.

    Meta tensors stand for device tensors. A CPU tensor created next to them (AdamW's `step` counter)
    lives in host memory: it counts for a CPU run only.
    """
    seen, total = set(), 0
    for t in tensors:
        if id(t) in seen or (t.device.type != "meta" and device_type != "cpu"):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _step_float_optimizers_on_meta(updater) -> None:
    """One real step of every float optimizer on meta tensors: their lazy state is created there."""
    for name, opt in updater.float_opts.items():
        p = updater.floats[name]
        p.grad = torch.empty_like(p)
        opt.step()
        p.grad = None


def _persistent(cfg: TrainConfig, device_type: str):
    model = build_model(cfg.model, cfg.quant, META)
    want = META_DTYPES[cfg.model.float_dtype]
    assert all(p.dtype == want for p in model.parameters()), (
        f"build_model left float parameters in {sorted({str(p.dtype) for p in model.parameters()})}, "
        f"[model] float_dtype is {cfg.model.float_dtype}")
    updater = build_updater(model, cfg)
    for name, layer in updater.int8.items():
        updater._method_state(name, updater.matrix_method, tuple(layer.codes.shape), META)
    for name, method in updater.method_floats.items():
        updater._method_state(name, method, tuple(updater.floats[name].shape), META)
    _step_float_optimizers_on_meta(updater)

    layers = updater.int8.values()
    codes = [l.codes for l in layers]
    groups = [t for l in layers for t in (l.scale, l.offset)]
    quantized = {id(t) for t in codes + groups}
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in quantized]
    meta_name = cfg.quant.meta_dtype
    method = cfg.optim.method
    comps = [
        Component("int8 codes", _nbytes(codes, device_type), "persistent", "Int8Linear.codes (build_model on meta)"),
        Component(f"group scale/offset ({meta_name})", _nbytes(groups, device_type), "persistent",
                  "Int8Linear.scale/offset (build_model on meta)"),
        Component(f"float parameters ({cfg.model.float_dtype}: embedding, norms, lm_head) + RoPE buffers",
                  _nbytes(floats, device_type), "persistent", "build_model on meta"),
        Component(f"{method} states", _nbytes(_tensors(updater.state), device_type), "persistent",
                  f"{type(updater.matrix_method).__name__}.init_state via Updater._method_state"),
    ]
    by_kind: dict[str, list[torch.Tensor]] = {}
    for opt in updater.float_opts.values():
        by_kind.setdefault(type(opt).__name__, []).extend(_tensors(list(opt.state.values())))
    for kind, tensors in sorted(by_kind.items()):
        comps.append(Component(f"{kind} states", _nbytes(tensors, device_type), "persistent",
                               f"{type(next(iter(updater.float_opts.values()))).__module__}.{kind}.step on meta"))
    return model, updater, comps


# ---- activations: the one formula ---------------------------------------------------------------------
@dataclass
class Activations:
    """Bytes saved for backward, by where they are saved (B x T tokens)."""

    block: int  # one decoder block, everything autograd keeps from its forward
    block_input: int  # the block's input hidden state (all a checkpointed block keeps)
    recomputed_block: int  # what the recompute of one checkpointed block allocates again
    final_norm: int  # final RMSNorm's saved tensors
    lm_head_input: int  # lm_head's saved input in the compute dtype
    lm_head_weight_copy: int  # autocast's cached cast of a float lm_head weight to the compute dtype
    log_softmax: int  # log-softmax output (fp32) saved by cross_entropy
    logits: int  # logits in the compute dtype (B, T, V)
    constant: int  # RoPE cos/sin tables and the token ids x, y
    attn_scores: int  # eager only: one (B, h, T, T) score tensor in the residual dtype (a forward transient)


def activation_bytes(*, B: int, T: int, d: int, ff: int, h: int, kv: int, V: int, attn: str,
                     compute: torch.dtype, float_dtype: torch.dtype) -> Activations:
    """Saved-tensor bytes of transformers' LlamaDecoderLayer with qtrain's Int8Linear, in train mode.

    Derivation (N = B·T tokens, hd = d/h, s / r / f = bytes per element of the compute dtype c, the
    residual dtype R and the float-parameter dtype F; checked on CPU tensor by tensor, tests/test_estimate.py):
    - dtypes. c is the autocast dtype, or F without autocast (Int8Linear computes in its input's dtype).
      The embedding output is F, each branch output is c, so the residual stream is R = promote(F, c).
      RoPE's cos/sin take the embedding's dtype, so q, k after RoPE are R as well.
    - LlamaRMSNorm(x): `x.to(fp32)` is saved by pow and mul (4Nd: x itself when R is fp32, else a copy),
      rsqrt(var) (4N), the normalised x in R saved by `weight * x` (rNd). Its output y is R.
    - Int8Linear saves `x.to(c)`: y itself when R == c (q, k, v share one tensor, gate and up another),
      else one c copy per projection (3 for attention, 2 for the MLP, 1 for lm_head). No weight is saved.
    - sdpa: autocast casts q, k to c; the kernel saves q (sNd), k and v (s·N·kv·hd each, GQA runs with
      enable_gqa, no repeat), out (sNd) and logsumexp (4·N·h). The flash/efficient kernels return out in
      (B, T, h, hd) layout, so `transpose(1, 2).contiguous()` is a no-op and o_proj saves that same tensor.
    - eager: q, k, v after repeat_kv (sNd each, the matmuls save their contiguous c inputs), softmax's fp32
      probabilities (4·B·h·T²) and their c copy for the second matmul when c is not fp32 (s·B·h·T²), and
      o_proj's contiguous input (sNd). The masked scores (r·B·h·T²) exist only during the forward.
    - MLP: gate out (saved by silu), silu out and up out (saved by their product), the product (down_proj
      input): 4·s·N·ff. Residual additions save nothing; rope multiplies by constants and saves only cos/sin.
    - Head: final norm as above, lm_head input (sNd), autocast's cached c copy of an F lm_head weight
      (s·V·d, F != c), logits (s·N·V, a transient), log-softmax output (4·N·V): `lm_loss` upcasts
      logits to fp32 and cross_entropy saves only the log-softmax result.
    - Checkpointing (non-reentrant): a block keeps only its input (rNd); its recompute allocates the block's
      saved tensors again, except x.to(fp32) when R is fp32 (that is the kept input itself).
    """
    N, hd = B * T, d // h
    s, f = compute.itemsize, float_dtype.itemsize
    R = torch.promote_types(float_dtype, compute)
    r = R.itemsize
    norm = F32 * N * d + F32 * N + r * N * d
    shared = R == compute  # projections save y itself, else one compute-dtype copy each
    qkv_inputs = s * N * d * (1 if shared else 3)
    mlp_inputs = s * N * d * (1 if shared else 2)
    if attn == "sdpa":
        attention = s * N * d + 2 * s * N * kv * hd + s * N * d + F32 * N * h
        scores = 0
    else:
        probs = B * h * T * T
        attention = 3 * s * N * d + F32 * probs + (s * probs if compute != torch.float32 else 0) + s * N * d
        scores = r * probs
    mlp = 4 * s * N * ff
    block = 2 * norm + qkv_inputs + attention + mlp_inputs + mlp
    block_input = r * N * d
    recomputed = block - (F32 * N * d if R == torch.float32 else 0)
    return Activations(
        block=block,
        block_input=block_input,
        recomputed_block=recomputed,
        final_norm=norm,
        lm_head_input=s * N * d,
        lm_head_weight_copy=s * V * d if float_dtype != compute else 0,
        log_softmax=F32 * N * V,
        logits=s * N * V,
        constant=2 * T * hd * f + 2 * N * torch.int64.itemsize,
        attn_scores=scores,
    )


# ---- transients of the update code paths --------------------------------------------------------------
def dequantize_peak(shape: tuple[int, int], compute: torch.dtype, triton: bool) -> int:
    """Int8Linear.dequantize -> dispatch.dequantize, in forward and again in backward.

    Triton writes Ŵ in the compute dtype directly (s·mn). The reference `dequantize_groupwise` holds two
    fp32 (m, n) tensors at once (`codes.float() * scale`, then `+ offset`), then casts: max(8mn, (4+s)mn).
    """
    mn = shape[0] * shape[1]
    if triton:
        return compute.itemsize * mn
    return max(2 * F32 * mn, (F32 + compute.itemsize) * mn if compute != torch.float32 else 0)


def direction_peak(method, shape: tuple[int, int], grad_dtype: torch.dtype) -> tuple[int, int, bool]:
    """(peak bytes while `method.direction` runs, bytes of the direction it returns, exact?).

    APOLLO / APOLLO-Mini (`Apollo.direction`, exact): P (a×r) is regenerated (`randn / √r`: 2 a·r fp32
    at once), `project_with_column_norms` holds R (r×b) and reads Ĝ in row chunks of at most
    APOLLO_CHUNK elements (a bf16 chunk is upcast: copy + square; fp32: square only), then
    `m / (v.sqrt() + eps)` holds two (r×b) temporaries (three with bias_correction = "inside").
    The other methods are approximated (notes say so): a dense fp32 direction (m×n) and, for the SVD
    methods, the thin SVD's U and Vᵀ plus one fp32 copy of G for the LAPACK/cuSOLVER workspace.
    """
    m, n = shape
    a, b = min(m, n), max(m, n)
    if isinstance(method, Apollo) and not isinstance(method, ApolloSVDMethod):
        r = method.rank
        rows = min(a, max(1, APOLLO_CHUNK // b))
        chunk = rows * b * (2 if grad_dtype != torch.float32 else 1) * F32
        moments = (3 if method.bias_correction == "inside" else 2) * F32 * r * b
        held = F32 * a * r + F32 * r * b
        return max(2 * F32 * a * r, held + chunk, held + moments), 0, True
    full = F32 * m * n
    svd = F32 * (m * a + a * n) + full
    if isinstance(method, ApolloSVDMethod):
        return svd + F32 * 3 * method.rank * b, 0, False
    dense = full
    if isinstance(method, AliceMethod):
        return dense + 2 * full, dense, False
    return dense + (svd if hasattr(method, "update_proj_gap") else full), dense, False


def _grad_copy(method, grad_dtype: torch.dtype, numel: int) -> int:
    """release._grad_for: an fp32 copy of a low-precision gradient unless the method upcasts chunk-wise."""
    if getattr(method, "accepts_low_precision_grad", False) or grad_dtype == torch.float32:
        return 0
    return F32 * numel


def int8_update_peak(shape, group_size: int, method, grad_dtype: torch.dtype, triton: bool, rounding: str) -> int:
    """Updater.update_int8 beyond the gradient itself.

    1. direction(_grad_for(grad)): the fp32 gradient copy (if any) plus the direction's own transients.
    2. dispatch.int8_scaled_update_: Triton updates codes in place; the reference (`requantize_sr_`) holds
       three fp32 buffers of one chunk (weights/grid positions, uniforms, floor), one for nearest rounding;
       a dense direction stays alive meanwhile.
    """
    m, n = shape
    dir_peak, dense, _ = direction_peak(method, shape, grad_dtype)
    step1 = _grad_copy(method, grad_dtype, m * n) + dir_peak
    chunk = min(m, rows_per_chunk((m, n), group_size, INT8_CHUNK)) * n
    buffers = 0 if triton and rounding == "stochastic" else (3 if rounding == "stochastic" else 1)
    return max(step1, dense + buffers * F32 * chunk)


def apply_update_peak(shape, param_dtype: torch.dtype, grad_dtype: torch.dtype, dense: bool) -> int:
    """optim.base.apply_update_, per chunk of at most APPLY_CHUNK elements (whole tensor if 1-D).

    d = update.rows(): grad.float() (a copy for bf16) * scale -> 4 B (dense fp32: a view); w = rows.float()
    (a copy for bf16 weights); `d * lr` (4 B). bf16 weights are written back with stochastic_round_to_bf16:
    int32 noise, bits + noise, & mask (4 B each) while w and d are alive.
    """
    if len(shape) > 1:
        cols = math.prod(shape[1:])
        ce = max(1, APPLY_CHUNK // cols) * cols
        ce = min(ce, math.prod(shape))
    else:
        ce = math.prod(shape)
    low = param_dtype != torch.float32
    d = 0 if dense else F32 * ce
    d_build = 0 if dense else (2 if grad_dtype != torch.float32 else 1) * F32 * ce
    w = F32 * ce if low else 0
    step = w + d + F32 * ce
    sr = w + d + 3 * F32 * ce if low else 0
    return max(d_build, step, sr)


def float_update_peak(name: str, updater, cfg: TrainConfig, device_type: str) -> int:
    """Updater.update_float beyond the gradient itself (float_grad_clip's norms are not modelled)."""
    p = updater.floats[name]
    shape, numel, dtype = tuple(p.shape), p.numel(), p.dtype
    if name in updater.method_floats:
        method = updater.method_floats[name]
        dir_peak, dense, _ = direction_peak(method, shape, dtype) if len(shape) == 2 else (0, F32 * numel, True)
        if len(shape) != 2 or not isinstance(method, Apollo):  # Adam (qtrain's, for bf16 tensors) and others
            if not isinstance(method, Apollo):
                # optim.adam.adam_direction: v.sqrt(), + eps, m / (...) -> two fp32 temporaries, one returned
                dir_peak, dense = max(dir_peak, 2 * F32 * numel), F32 * numel
        step1 = _grad_copy(method, dtype, numel) + dir_peak
        return max(step1, dense + apply_update_peak(shape, dtype, dtype, dense > 0))
    opt = updater.float_opts[name]
    if type(opt).__name__ == "AdamW":
        # torch _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): 2 temporaries
        return 2 * numel * dtype.itemsize
    # bitsandbytes Adam8bit: the CUDA kernel updates p and the 8-bit states in place. Its CPU fallback
    # (_optimizer_update_8bit_blockwise_cpu) dequantizes both states to fp32, copies g (and p if not fp32)
    # to fp32 and builds denom from two temporaries: 5 (6 for bf16) fp32 tensors of p's size.
    if device_type == "cuda":
        return 0
    return (5 + (dtype != torch.float32)) * F32 * numel


# ---- phases of one step -------------------------------------------------------------------------------
def _triton_int8(cfg: TrainConfig, device_type: str) -> bool:
    """dispatch._use_triton for this recipe on `device_type` (Triton assumed installed on CUDA machines).

    The layout rules are those of triton_kernels.check_supported: fp32 metadata, power-of-two group >= 4.
    """
    kernels = getattr(cfg.quant, "kernels", "torch")
    g = cfg.quant.group_size
    layout_ok = cfg.quant.meta_dtype == "float32" and g >= 4 and not g & (g - 1)
    return device_type == "cuda" and kernels != "torch" and layout_ok


def _phases(cfg: TrainConfig, updater, device_type: str, compute: torch.dtype) -> list[Phase]:
    m, t = cfg.model, cfg.train
    F = META_DTYPES[m.float_dtype]
    R = torch.promote_types(F, compute)
    s = compute.itemsize
    B, T, d = t.batch_size, t.seq_len, m.hidden_size
    N = B * T
    act = activation_bytes(B=B, T=T, d=d, ff=m.intermediate_size, h=m.num_heads, kv=m.kv_heads,
                           V=m.vocab_size, attn=m.attn_implementation, compute=compute, float_dtype=F)
    triton = _triton_int8(cfg, device_type)
    L = m.num_layers
    ckpt = t.activation_checkpointing
    blocks = L * act.block_input if ckpt else L * act.block
    blocks_name = (f"checkpointed block inputs ({L} x B x T x d)" if ckpt
                   else f"saved activations ({L} blocks, {m.attn_implementation}, {B} x {T})")
    recompute_name = "one block recomputed (checkpointing)"
    recompute = act.recomputed_block if ckpt else 0

    def with_blocks(parts: dict[str, int], recomputing: bool = False) -> dict[str, int]:
        out = {blocks_name: blocks, "RoPE tables and token ids": act.constant}
        if recomputing and ckpt:
            out[recompute_name] = recompute
        out.update(parts)
        return out

    # Per int8 layer of one block: forward dequantize, backward dequantize + dX, then dW + its update.
    block_layers = [(n, l) for n, l in updater.int8.items() if ".layers.0." in n] or list(updater.int8.items())
    release = t.release
    fwd_deq = max((dequantize_peak(tuple(l.codes.shape), compute, triton) for _, l in block_layers), default=0)
    bwd, bwd_name = 0, ""
    for name, layer in block_layers:
        out_f, in_f = layer.codes.shape
        mn = out_f * in_f
        dx = s * N * in_f
        during = max(dequantize_peak((out_f, in_f), compute, triton), s * mn + dx)
        after = dx + s * mn + (int8_update_peak((out_f, in_f), layer.group_size, updater.matrix_method, compute, triton,
                                                cfg.quant.rounding) if release else 0)
        if max(during, after) > bwd:
            bwd, bwd_name = max(during, after), name.split(".")[-1]
    grads_in_flight = r_bytes = R.itemsize * N * d + (s * N * d if R != compute else 0)

    head_saved = {
        "final norm saved": act.final_norm,
        "lm_head saved input" + (" + compute-dtype weight copy" if act.lm_head_weight_copy else ""):
            act.lm_head_input + act.lm_head_weight_copy,
    }
    lsm = "log-softmax output (fp32)"
    phases = []
    # Forward, inside the last block: the block's saved tensors plus the dequantized weight.
    phases.append(Phase("forward (last block)", with_blocks({
        "dequantized weight (forward)": fwd_deq + act.attn_scores,
        **({recompute_name: act.block} if ckpt else {}),
    })))
    # lm_loss: logits (c) -> .float() (fp32 copy unless c is fp32) -> log_softmax (fp32, saved).
    logits_fwd = act.logits + (F32 * N * m.vocab_size if compute != torch.float32 else 0)
    phases.append(Phase("loss forward (logits, fp32 upcast in lm_loss)", with_blocks({
        **head_saved, lsm: act.log_softmax, "logits and loss (fp32 upcast in lm_loss)": logits_fwd})))
    # loss.backward: nll_loss_backward's dense fp32 grad and _log_softmax_backward_data's output (2 x 4NV).
    phases.append(Phase("loss backward (log-softmax grad)", with_blocks({
        **head_saved, lsm: act.log_softmax, "logits and loss (fp32 upcast in lm_loss)": 2 * F32 * N * m.vocab_size})))
    # lm_head backward: dlogits (c), dX (sNd), dW (c), autocast's cast of dW to F, then the release hook.
    lm = next((n for n in updater.floats if n.startswith("lm_head")), None)
    emb = next((n for n in updater.floats if n.endswith("embed_tokens.weight")), None)
    V = m.vocab_size
    if lm is not None:
        f_grad = updater.floats[lm].numel() * F.itemsize
        c_grad = updater.floats[lm].numel() * s
        mm = act.logits + s * N * d + c_grad
        cast = s * N * d + c_grad + f_grad if F != compute else 0
        upd = float_update_peak(lm, updater, cfg, device_type) if release else 0
        hook = s * N * d + f_grad + upd
        phases.append(Phase("lm_head backward + update", with_blocks({
            "final norm saved": act.final_norm,
            "lm_head gradient + update": max(mm + (act.lm_head_input + act.lm_head_weight_copy), cast, hook)})))
    phases.append(Phase(f"block backward (last block, {bwd_name})", with_blocks({
        "activation gradients in flight": grads_in_flight,
        f"int8 layer backward ({bwd_name}: dequantized weight, dX, dW{' + update' if release else ''})": bwd,
    }, recomputing=True)))
    if release and emb is not None:
        p = updater.floats[emb]
        phases.append(Phase("embedding backward + update", {
            "RoPE tables and token ids": act.constant,
            "embedding gradient + update": p.numel() * p.element_size() + float_update_peak(emb, updater, cfg, device_type)}))
    if not release:
        phases.append(_finish_step_phase(cfg, updater, device_type, compute, triton, act.constant))
    del r_bytes, V
    return phases


def _finish_step_phase(cfg, updater, device_type, compute, triton, constant) -> Phase:
    """release = false: every gradient is alive after backward; Updater.finish_step frees them one by one."""
    grads = {n: l.codes.numel() * compute.itemsize for n, l in updater.int8.items()}
    grads.update({n: p.numel() * p.element_size() for n, p in updater.floats.items()})
    live, peak, at = sum(grads.values()), 0, ""
    for name, layer in updater.int8.items():
        extra = int8_update_peak(tuple(layer.codes.shape), layer.group_size, updater.matrix_method, compute, triton, cfg.quant.rounding)
        if live + extra > peak:
            peak, at = live + extra, name
        live -= grads[name]
    for name in updater.floats:
        extra = float_update_peak(name, updater, cfg, device_type)
        if live + extra > peak:
            peak, at = live + extra, name
        live -= grads[name]
    total = sum(grads.values())
    return Phase("updates after backward (release = false)", {
        "RoPE tables and token ids": constant,
        "all gradients (release = false)": total,
        f"update transient ({at})": peak - total,
    })


# ---- the estimate ---------------------------------------------------------------------------------------
NOT_MODELLED = {
    ("train", "compile"): lambda v: v, 
}


def _notes(cfg: TrainConfig, updater, device_type: str, compute: torch.dtype) -> list[str]:
    notes = []
    if cfg.train.compile:
        notes.append("train.compile = true is not modelled: torch.compile fuses ops and changes which tensors "
                     "are saved; the estimate is for eager mode")
    if cfg.optim.float_grad_clip > 0:
        notes.append("optim.float_grad_clip > 0: the per-tensor clip's norm temporaries are not modelled (small)")
    if cfg.model.tie_embeddings:
        notes.append("model.tie_embeddings = true: the shared weight is counted once; its two gradient "
                     "contributions are modelled as one")
    if not cfg.quant.enabled:
        notes.append("quant.enabled = false: float projections are not modelled beyond their parameters, "
                     "optimizer states and gradients (autocast weight copies are missing)")
    if cfg.train.grad_accum_steps > 1:
        notes.append(f"train.grad_accum_steps = {cfg.train.grad_accum_steps}: one micro-batch's activations; "
                     "gradients accumulate in place")
    _, _, exact = direction_peak(updater.matrix_method, (8, 16), compute)
    if not exact:
        notes.append(f"optim.method = {cfg.optim.method!r}: its direction transients (dense update, SVD at a "
                     "projection refresh) are approximated; APOLLO / APOLLO-Mini are exact")
    if device_type == "cuda":
        kernels = "Triton (fused, no fp32 transients; assumes triton is installed)" if _triton_int8(cfg, device_type) \
            else "torch reference (chunked)"
        notes.append(f"int8 dequantize/update kernels: {kernels}")
        notes.append(f"CUDA context ({CUDA_CONTEXT_BYTES / MiB:.0f} MiB) and allocator slack "
                     f"({ALLOCATOR_SLACK:.0%} of the step's transients) are assumptions, not measured here")
    notes.append("evaluation and text sampling run under no_grad and stay below a training step (not modelled)")
    return notes


def _load(recipe_or_cfg) -> tuple[TrainConfig, str]:
    if isinstance(recipe_or_cfg, TrainConfig):
        return recipe_or_cfg, "<config>"
    path = Path(recipe_or_cfg)
    if not path.is_file():
        from qtrain.cli import find_recipe

        path = find_recipe(str(recipe_or_cfg))
    return TrainConfig.from_toml(path), str(path)


def estimate(recipe_or_cfg: TrainConfig | str | Path, device_type: str = "cuda") -> Breakdown:
    """Predicted peak memory of one training step; `recipe_or_cfg` is a TrainConfig or a recipe path/name.

    device_type "cuda" (bf16 autocast for dtype = "auto", Triton int8 kernels, bitsandbytes' CUDA kernel)
    or "cpu" (fp32 for "auto", torch references; what tests/test_estimate.py measures).
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type = {device_type!r}; use 'cuda' or 'cpu'")
    cfg, source = _load(recipe_or_cfg)
    autocast = autocast_dtype(cfg, torch.device(device_type))
    compute = autocast if autocast != torch.float32 else META_DTYPES[cfg.model.float_dtype]
    model, updater, comps = _persistent(cfg, device_type)
    phases = _phases(cfg, updater, device_type, compute)
    persistent = sum(c.bytes for c in comps)
    peak_phase = max(phases, key=lambda p: p.bytes)
    peak_allocated = persistent + peak_phase.bytes

    # Non-persistent components: each at its largest over the phases.
    seen: dict[str, int] = {}
    for p in phases:
        for name, nbytes in p.parts.items():
            seen[name] = max(seen.get(name, 0), nbytes)
    for name, nbytes in seen.items():
        kind = "activation" if any(k in name for k in ("saved", "activations", "block", "RoPE")) \
            and "backward" not in name else "transient"
        comps.append(Component(name, nbytes, kind, _CODE_PATHS.get(name.split(" (")[0], "see estimate._phases")))

    if device_type == "cuda":
        slack = int(ALLOCATOR_SLACK * peak_phase.bytes) + _rounding_waste(comps)
        context = CUDA_CONTEXT_BYTES
    else:
        slack = context = 0
    comps.append(Component("allocator slack (reserved - allocated)", slack, "overhead",
                           "CUDA caching allocator: 2 MiB rounding of large blocks + fragmentation"))
    comps.append(Component("CUDA context (outside max_memory_allocated)", context, "overhead",
                           "cuda init, cuBLAS/cuDNN handles"))
    peak_part = max(peak_phase.parts.items(), key=lambda kv: kv[1])[0]
    largest = max((c for c in comps if c.kind != "overhead"), key=lambda c: c.bytes).name
    return Breakdown(
        recipe=source, device_type=device_type, compute_dtype=str(compute).removeprefix("torch."),
        components=comps, phases=phases, persistent_bytes=persistent, peak_allocated=peak_allocated,
        peak_reserved=peak_allocated + slack, total_on_gpu=peak_allocated + slack + context,
        peak_phase=peak_phase.name, peak_component=peak_part, largest_component=largest,
        notes=_notes(cfg, updater, device_type, compute),
    )


_CODE_PATHS = {
    "saved activations": "estimate.activation_bytes (LlamaDecoderLayer + Int8Linear saved tensors)",
    "checkpointed block inputs": "estimate.activation_bytes (non-reentrant checkpoint keeps block inputs)",
    "one block recomputed": "estimate.activation_bytes (recompute of one block in backward)",
    "RoPE tables and token ids": "LlamaRotaryEmbedding cos/sin, batch x/y",
    "final norm saved": "estimate.activation_bytes (final LlamaRMSNorm)",
    "lm_head saved input": "estimate.activation_bytes (lm_head under autocast)",
    "lm_head saved input + compute-dtype weight copy": "estimate.activation_bytes (lm_head under autocast)",
    "log-softmax output": "train.lm_loss -> F.cross_entropy",
    "logits and loss": "train.lm_loss: logits.float(), log_softmax and its backward",
    "dequantized weight": "estimate.dequantize_peak (Int8Linear forward)",
    "lm_head gradient + update": "lm_head backward, Updater.update_float (estimate.float_update_peak)",
    "activation gradients in flight": "residual-stream gradient (+ its compute-dtype copy)",
    "int8 layer backward": "_Int8LinearFn.backward + Updater.update_int8 (estimate.int8_update_peak)",
    "embedding gradient + update": "embedding backward, Updater.update_float (estimate.float_update_peak)",
    "all gradients": "Int8Linear.weight_grad + .grad of every float tensor (release = false)",
    "update transient": "Updater.finish_step -> update_int8 / update_float",
}


def _rounding_waste(comps: list[Component]) -> int:
    return 0


# ---- command line ---------------------------------------------------------------------------------------
def main(args) -> int:
    from qtrain.cli import find_recipe, load_config

    cfg = load_config(args.recipe, args.set)
    source = str(find_recipe(args.recipe))
    b = estimate(cfg)
    b.recipe = source
    fit = None
    if args.gpu_gib is not None:
        fit = _fit(cfg, args.gpu_gib, b)
    if args.json:
        out = b.to_dict()
        if fit is not None:
            out["fit"] = fit
        print(json.dumps(out, indent=2))
    else:
        print(format_breakdown(b))
        if fit is not None:
            print(format_fit(fit))
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:8.3f} GiB"


def format_breakdown(b: Breakdown) -> str:
    lines = [f"qtrain estimate: {b.recipe} on {b.device_type} (compute dtype {b.compute_dtype})", ""]
    width = max(len(c.name) for c in b.components) + 2
    for kind in ("persistent", "activation", "transient", "overhead"):
        for c in b.components:
            if c.kind == kind:
                lines.append(f"  {c.name:<{width}}{_gib(c.bytes)}  {kind:<10}  {c.code_path}")
    lines += ["", "phases (non-persistent bytes alive):"]
    for p in b.phases:
        mark = "  <- peak" if p.name == b.peak_phase else ""
        lines.append(f"  {p.name:<{width}}{_gib(p.bytes)}{mark}")
    lines += [
        "",
        f"  persistent                    {_gib(b.persistent_bytes)}",
        f"  peak allocated                {_gib(b.peak_allocated)}   (torch.cuda.max_memory_allocated)",
        f"  peak reserved                 {_gib(b.peak_reserved)}   (torch.cuda.max_memory_reserved)",
        f"  total on the GPU              {_gib(b.total_on_gpu)}   (reserved + CUDA context)",
        f"  peak set by: {b.peak_component} during {b.peak_phase}",
        f"  largest component: {b.largest_component}",
    ]
    if b.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in b.notes]
    return "\n".join(lines)


# --gpu-gib: recipe changes tried in order, cumulatively, until the predicted total fits.
def _candidate_changes(cfg: TrainConfig) -> list[list[str]]:
    steps: list[list[str]] = []
    if not cfg.train.activation_checkpointing:
        steps.append(["train.activation_checkpointing=true"])
    b = cfg.train.batch_size
    while b > 1:
        b //= 2
        steps.append([f"train.batch_size={b}"])
    T = cfg.train.seq_len
    while T > 64:
        T //= 2
        steps.append([f"train.seq_len={T}"])
    if cfg.quant.meta_dtype != "bfloat16":
        steps.append(["quant.meta_dtype=bfloat16"])
    if cfg.model.float_dtype != "bfloat16":
        steps.append(["model.float_dtype=bfloat16"])
    if cfg.optim.embedding_optimizer != "same_as_matrices" or cfg.optim.lm_head_optimizer != "same_as_matrices":
        steps.append(["optim.embedding_optimizer=same_as_matrices", "optim.lm_head_optimizer=same_as_matrices"])
    return steps


def _fit(cfg: TrainConfig, gpu_gib: float, b: Breakdown) -> dict:
    budget = int(gpu_gib * GiB)
    result = {"gpu_gib": gpu_gib, "fits": b.total_on_gpu <= budget, "total_on_gpu": b.total_on_gpu, "set": []}
    if result["fits"]:
        return result
    changes: list[str] = []
    for step in _candidate_changes(cfg):
        changes = [c for c in changes if c.split("=")[0] not in {s.split("=")[0] for s in step}] + step
        trial = estimate(cfg.apply_overrides(changes))
        if trial.total_on_gpu <= budget:
            result.update(set=changes, total_after=trial.total_on_gpu)
            return result
    result["total_after"] = trial.total_on_gpu if changes else b.total_on_gpu
    result["set"] = None
    return result


def format_fit(fit: dict) -> str:
    head = f"\n--gpu-gib {fit['gpu_gib']:g}: "
    if fit["fits"]:
        return head + f"fits ({fit['total_on_gpu'] / GiB:.2f} GiB total on the GPU)"
    if fit["set"] is None:
        return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB), and no tried change makes it fit "
                       f"(leanest: {fit['total_after'] / GiB:.2f} GiB)")
    flags = " ".join(f"--set {c}" for c in fit["set"])
    return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB); this fits "
                   f"({fit['total_after'] / GiB:.2f} GiB):\n  {flags}")
