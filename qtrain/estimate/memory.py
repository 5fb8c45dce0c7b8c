"""Peak memory of one training step of a recipe, predicted before it runs (`qtrain estimate`).

Persistent bytes are never computed from formulas: the model is built with `build_model` on the meta
device, the updater with `build_updater`, every method state is created by the method's own
`init_state` (through `Updater.method_state`, the trainer's own path) and every float optimizer takes
one real step on meta tensors so bitsandbytes / torch create their lazy state there; the estimator sums
the `nbytes`. Only what lives during a step is modelled: saved activations (one function,
`activation_bytes`, with its derivation) and the transients of the update code paths (the `*_peak`
functions, each naming the lines it models). A step is a sequence of phases (forward, loss, lm_head
update, block backward, embedding update; for release = false the updates after backward); the
predicted peak is the persistent bytes plus the largest phase.

    from qtrain.estimate.memory import estimate
    b = estimate("recipes/7b.toml")              # or a TrainConfig; device_type="cpu" for a CPU run
    print(b.peak_allocated / 2**30, b.peak_phase, b.peak_component)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype
from qtrain.model.builder import META_DTYPES, build_model, is_quantized_projection
from qtrain.optim import adam8bit
from qtrain.optim.adam import Adam
from qtrain.optim.alice import AliceMethod
from qtrain.optim.apollo import Apollo, project_with_column_norms
from qtrain.optim.apollo_svd import ApolloSVDMethod
from qtrain.optim.base import apply_update_
from qtrain.optim.fused_adam import FusedAdamWSlot
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.stochastic_round import rows_per_chunk
from qtrain.update.build import build_updater

GiB, MiB = 2**30, 2**20
F32 = torch.float32.itemsize
META = torch.device("meta")

# Chunk limits of the chunked code paths, read from their signatures (never a copied literal).
INT8_CHUNK = inspect.signature(int8_scaled_update_).parameters["max_chunk_elems"].default
APPLY_CHUNK = inspect.signature(apply_update_).parameters["max_chunk_elems"].default
APOLLO_CHUNK = inspect.signature(project_with_column_norms).parameters["max_chunk_elems"].default

# Outside what this machine can measure: assumptions for CUDA, to calibrate with
# tools/validate_estimator.py on a GPU (it prints the measured context and reserved - allocated).
CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context + cuBLAS/cuDNN handles of a torch 2.x process (nvidia-smi)
# NCCL's own buffers for a data-parallel process (an assumption until measured: NCCL_BUFFSIZE 4 MiB x up to
# 16 channels x send + receive); outside the torch allocator, like the context.
NCCL_BUFFER_BYTES = 128 * MiB
ALLOCATOR_SLACK = 0.05  # share of the step's transients held in cached blocks too small for the next request
# CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp): blocks are multiples of 512 B; a request of
# 10 MiB or more gets its own segment rounded up to 2 MiB, and a tail of at most 1 MiB is not split off,
# so it counts as allocated.
CUDA_BLOCK, CUDA_LARGE_ALLOC, CUDA_ROUND_LARGE, CUDA_SMALL_SIZE = 512, 10 * MiB, 2 * MiB, 1 * MiB


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
    """Predicted memory of one training step of `recipe` on `device_type` (bytes)."""

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p, phase in zip(d["phases"], self.phases):
            p["bytes"] = phase.bytes
        return d


# ---- persistent bytes: the real constructors on the meta device ----------------------------------------
def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _on_device(tensors, device_type: str) -> list[torch.Tensor]:
    """Distinct tensors that live on the training device.

    Meta tensors stand for device tensors. A CPU tensor created beside them (AdamW's `step` counter) lives
    in host memory: it counts for a CPU run only.
    """
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen and (t.device.type == "meta" or device_type == "cpu"):
            seen.add(id(t))
            out.append(t)
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def _step_float_optimizers_on_meta(updater) -> None:
    """One real step of every float optimizer on meta tensors: their lazy state is created there."""
    for name, opt in updater.float_opts.items():
        p = updater.floats[name]
        p.grad = torch.empty_like(p)
        opt.step()
        p.grad = None


def _shard_bytes(t: torch.Tensor, shards: int, dim: int | None) -> int:
    """Bytes of one rank's torch.chunk block of t along dim (FSDP2's and qtrain.parallel.fsdp's split); dim None or a
    0-dim tensor: replicated."""
    if shards == 1 or dim is None or t.dim() == 0:
        return t.numel() * t.element_size()
    size = t.shape[dim]
    return -(-size // shards) * (t.numel() // max(size, 1)) * t.element_size()


def _persistent(cfg: TrainConfig, device_type: str, shards: int = 1):
    """(updater on meta, persistent components, the persistent tensors) from the trainer's constructors.

    shards > 1 (FSDP2, qtrain.parallel.fsdp): each component counts one rank's blocks: weights, float tensors and
    optimizer states by rows, APOLLO's moments by columns; the RoPE buffers and scalars are replicated."""
    model = build_model(cfg.model, cfg.quant, META)
    want = META_DTYPES[cfg.model.float_dtype]
    assert all(p.dtype == want for p in model.parameters()), (
        f"build_model stored float parameters in {sorted({str(p.dtype) for p in model.parameters()})}; "
        f"[model] float_dtype = {cfg.model.float_dtype!r}")
    updater = build_updater(model, cfg)
    for name, layer in updater.int8.items():  # what update_int8 creates at the first step
        updater.method_state(name, updater.matrix_method, tuple(layer.codes.shape), META)
    for name, method in updater.method_floats.items():  # what update_float creates at the first step
        updater.method_state(name, method, tuple(updater.floats[name].shape), META)
    _step_float_optimizers_on_meta(updater)

    layers = updater.int8.values()
    codes = [l.codes for l in layers]
    groups = [t for l in layers for t in (l.scale, l.offset)]
    quantized = {id(t) for t in codes + groups}
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in quantized]
    buffers = {id(t) for t in model.buffers()} - quantized  # RoPE tables: replicated under FSDP2
    groups_of = [
        (Component("int8 codes", 0, "persistent", "Int8Linear.codes (build_model on meta)"), codes),
        (Component(f"group scale/offset ({cfg.quant.meta_dtype})", 0, "persistent",
                   "Int8Linear.scale/offset (build_model on meta)"), groups),
        (Component(f"float parameters ({cfg.model.float_dtype}: embedding, norms, lm_head) + RoPE buffers", 0,
                   "persistent", "build_model on meta"), floats),
    ]
    method_tensors: set[int] = set()
    by_method: dict[str, list] = {}
    for name, state in updater.state.items():
        method = updater.method_floats.get(name, updater.matrix_method)
        label = cfg.optim.method if method is updater.matrix_method else f"{type(method).__name__} (bf16 floats)"
        by_method.setdefault(label, [type(method).__name__, []])[1].extend(_tensors(state))
        method_tensors.update(id(t) for t in _tensors(state))
    for label, (cls, tensors) in by_method.items():
        groups_of.append((Component(f"{label} states", 0, "persistent",
                                    f"{cls}.init_state via Updater.method_state on meta"), tensors))
    by_opt: dict[str, list] = {}
    for opt in updater.float_opts.values():
        kind = type(opt)
        label = getattr(kind, "STATE_LABEL", kind.__name__)  # FusedAdamWSlot: the group's flat buffers, by slice
        by_opt.setdefault(label, [f"{kind.__module__}.{kind.__name__}", []])[1].extend(
            _tensors(list(opt.state.values())))
    for label, (path, tensors) in sorted(by_opt.items()):
        groups_of.append((Component(f"{label} states", 0, "persistent", f"{path}.step on meta"), tensors))
    comps, everything = [], []
    for comp, tensors in groups_of:
        tensors = _on_device(tensors, device_type)
        comp.bytes = sum(_shard_bytes(t, shards, None if id(t) in buffers else -1 if id(t) in method_tensors
                                      and t.dim() == 2 else 0) for t in tensors)
        comps.append(comp)
        everything += tensors
    return updater, comps, everything


def _cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator accounts as allocated for one tensor of nbytes."""
    block = -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK
    if block >= CUDA_LARGE_ALLOC:
        segment = -(-block // CUDA_ROUND_LARGE) * CUDA_ROUND_LARGE
        if segment - block <= CUDA_SMALL_SIZE:  # remainder too small to split off
            block = segment
    return block


# ---- activations: the one formula -------------------------------------------------------------------------
@dataclass
class Activations:
    """Bytes saved for backward (and the head's transients) of one micro-batch of B x T tokens."""

    norm: int  # one LlamaRMSNorm's saved tensors (a block has two, the head one)
    qkv_inputs: int  # what q/k/v_proj save of their input
    attention: int  # attention's saved tensors (sdpa or eager), o_proj's input included
    mlp_inputs: int  # what gate/up_proj save of their input
    mlp_unit: int  # one (B, T, ff) tensor in the compute dtype; the MLP saves four
    block_input: int  # the block's input hidden state: all a checkpointed block keeps
    x32_is_input: bool  # the norms' fp32 input is the block input itself (residual stream in fp32)
    lm_head_input: int  # lm_head's saved input in the compute dtype
    lm_head_weight_copy: int  # autocast's cached compute-dtype copy of a float lm_head weight
    log_softmax: int  # log-softmax output (fp32) saved by cross_entropy
    logits: int  # logits in the compute dtype (B, T, V): a transient
    constant: int  # RoPE cos/sin tables, the token ids x, y and nll_loss's total_weight
    attn_scores: int  # eager only: the masked (B, h, T, T) scores in the residual dtype, a forward transient
    causal_mask: int  # eager only: the (B, 1, T, T) mask in F, alive through the forward (and with
    # checkpointing until the last block's backward: the checkpoints keep their arguments)
    weight_copies: int = 0  # quant.enabled = false: autocast's c copies of a block's F projection weights
    q_norm: int = 0  # Qwen3: the q RMSNorm's saved tensors (per head), freed before k_proj's backward
    k_norm: int = 0  # Qwen3: the k RMSNorm's, freed before q_norm's backward

    @property
    def block(self) -> int:
        """Everything autograd keeps from one decoder block's forward."""
        return (2 * self.norm + self.qkv_inputs + self.attention + self.mlp_inputs + 4 * self.mlp_unit
                + self.weight_copies + self.q_norm + self.k_norm)

    @property
    def recomputed_block(self) -> int:
        """What the recompute of a checkpointed block allocates again (its input is kept already)."""
        return self.block - (self.block_input if self.x32_is_input else 0)

    @property
    def final_norm(self) -> int:
        return self.norm

    def alive_at(self, projection: str, recomputed: bool = False) -> int:
        """A block's saved bytes still alive when backward reaches `projection` (e.g. "up_proj").

        Backward frees each op's saved tensors once it ran: down_proj sees the whole block; up_proj (run
        before silu's backward) still sees gate's output; gate_proj the attention half plus norm2 and the
        MLP inputs; o_proj the attention half; v/k/q_proj only norm1 and their inputs.
        """
        first = self.norm - (self.block_input if recomputed and self.x32_is_input else 0)
        attention_half = first + self.qkv_inputs
        qk = self.q_norm + self.k_norm  # v_proj (created after them) back-propagates before the q/k norms
        mlp_half = attention_half + self.attention + qk + self.norm + self.mlp_inputs
        alive = {"down_proj": mlp_half + 4 * self.mlp_unit, "up_proj": mlp_half + self.mlp_unit,
                 "gate_proj": mlp_half, "o_proj": attention_half + self.attention + qk,
                 "v_proj": attention_half + qk, "k_proj": attention_half + self.q_norm}.get(projection, attention_half)
        return alive + self.weight_copies  # (float projections only; freed one by one, counted whole)


def activation_bytes(*, B: int, T: int, d: int, ff: int, h: int, kv: int, V: int, attn: str,
                     compute: torch.dtype, float_dtype: torch.dtype, quantized: bool = True, head_dim: int = 0,
                     qk_norm: bool = False) -> Activations:
    """Saved-tensor bytes of transformers' LlamaDecoderLayer with qtrain's Int8Linear, in train mode.

    Derivation (N = B·T tokens, hd = d/h; s, r, f = bytes per element of the compute dtype c, the
    residual dtype R and the float-parameter dtype F; tests/test_estimate.py checks it on CPU in fp32,
    bf16 autocast and bf16 parameters, sdpa and eager, with and without checkpointing):
    - dtypes. c is the autocast dtype, or F without autocast (Int8Linear computes in its input's dtype).
      The embedding outputs F and each branch outputs c, so the residual stream is R = promote(F, c).
      RoPE's cos/sin take the embedding's dtype, so q and k after RoPE are R as well.
    - LlamaRMSNorm(x): `x.to(fp32)` is saved by pow and mul (4Nd: x itself when R is fp32, else a copy),
      rsqrt(var) (4N), and the normalised x in R saved by `weight * x` (rNd). Its output y is R.
    - Int8Linear saves `x.to(c)`: y itself when R == c (q, k, v share one tensor, gate and up another),
      else one c copy per projection (3 in attention, 2 in the MLP, 1 for lm_head). No weight is saved.
    - sdpa: autocast casts q, k to c; the kernel saves q (sNd), k and v (s·N·kv·hd each: GQA runs with
      enable_gqa, no repeat_kv), out (sNd) and logsumexp (4·N·h). The flash/efficient kernels return out
      in (B, T, h, hd) layout, so `transpose(1, 2).contiguous()` is a no-op: o_proj saves that same tensor.
    - eager: q, k, v after repeat_kv (sNd each: the matmuls save their contiguous c inputs), softmax's fp32
      probabilities (4·B·h·T²) plus their c copy for the second matmul when c is not fp32 (s·B·h·T²), and
      o_proj's contiguous input (sNd). The masked scores (r·B·h·T²) live only during the forward, the
      causal mask (f·B·T², shared by the blocks) as long as the forward, or the checkpoints, hold it.
    - MLP: gate out (saved by silu), silu out and up out (saved by their product), the product (down_proj's
      input): 4·s·N·ff. Residual additions save nothing; RoPE multiplies by constants, saving only cos/sin.
    - Head: final norm as above; lm_head's input (sNd) and, under autocast, its cached c copy of an F
      weight (s·V·d when F != c); logits (s·N·V, transient); `lm_loss` upcasts them to fp32 and
      cross_entropy saves only the log-softmax output (4·N·V), the targets and a 0-dim total_weight.
    - quant.enabled = false: the projections are nn.Linear with F weights; under autocast each saves its
      cached c copy of the weight (s·d·(2d + 2·kv·hd + 3·ff) per block when F != c).
    - Checkpointing (non-reentrant): a block keeps only its input (rNd); its recompute in backward allocates
      the block's saved tensors again, except `x.to(fp32)` when R is fp32 (that is the kept input).
    - Checkpoints ([model] init): head_dim (Qwen3's own) makes the query width h·hd instead of d in the
      attention terms above; Qwen3's q/k RMSNorms save (4 + s)·N·width + 4·N·heads each (qk_norm); Qwen2's
      q/k/v biases are added to the c output (`y + b.to(c)`) and save nothing.
    """
    N, hd = B * T, head_dim or d // h
    q = h * hd  # query width: d, unless a checkpoint sets its own head_dim (Qwen3)
    s, f = compute.itemsize, float_dtype.itemsize
    R = torch.promote_types(float_dtype, compute)
    r = R.itemsize
    norm = F32 * N * d + F32 * N + r * N * d
    shared = R == compute
    qkv_inputs = s * N * d * (1 if shared else 3)
    mlp_inputs = s * N * d * (1 if shared else 2)
    if attn == "sdpa":
        attention = s * N * q + 2 * s * N * kv * hd + s * N * q + F32 * N * h
        scores = mask = 0
    else:
        probs = B * h * T * T
        attention = 3 * s * N * q + F32 * probs + (s * probs if compute != torch.float32 else 0) + s * N * q
        scores = r * probs
        mask = f * B * T * T
    return Activations(
        norm=norm,
        qkv_inputs=qkv_inputs,
        attention=attention,
        mlp_inputs=mlp_inputs,
        mlp_unit=s * N * ff,
        block_input=r * N * d,
        x32_is_input=R == torch.float32,
        lm_head_input=s * N * d,
        lm_head_weight_copy=s * V * d if float_dtype != compute else 0,
        log_softmax=F32 * N * V,
        logits=s * N * V,
        constant=2 * T * hd * f + 2 * N * torch.int64.itemsize + F32,
        attn_scores=scores,
        causal_mask=mask,
        weight_copies=0 if quantized or float_dtype == compute else s * d * (2 * q + 2 * kv * hd + 3 * ff),
        # Qwen3RMSNorm of each head's q (k): x.to(fp32) saved by pow and mul, rsqrt per head, the normalised
        # x in its input dtype c saved by `weight * x`
        q_norm=(F32 + s) * N * q + F32 * N * h if qk_norm else 0,
        k_norm=(F32 + s) * N * kv * hd + F32 * N * kv if qk_norm else 0,
    )


# ---- transients of the update code paths --------------------------------------------------------------
def dequantize_peak(shape: tuple[int, int], compute: torch.dtype, triton: bool) -> int:
    """Int8Linear.dequantize -> dispatch.dequantize (forward, and again in backward).

    Triton writes Ŵ in the compute dtype directly (s·mn). The reference `dequantize_groupwise` fills one
    fp32 (m, n) buffer in place; the final cast to a narrower compute dtype holds it and the s·mn result.
    """
    mn = shape[0] * shape[1]
    if triton:
        return compute.itemsize * mn
    return F32 * mn + (0 if compute == torch.float32 else compute.itemsize * mn)


def direction_peak(method, shape: tuple[int, int], grad_dtype: torch.dtype) -> tuple[int, int, bool]:
    """(peak bytes while `method.direction` runs, bytes of the dense direction it returns, exact?).

    APOLLO / APOLLO-Mini (`Apollo.direction`, exact): P (a×r) is regenerated (`randn / √r`: 2·a·r fp32
    at once); `project_with_column_norms` holds R (r×b) and reads Ĝ in row chunks of at most APOLLO_CHUNK
    elements (a bf16 chunk is upcast, then squared; an fp32 one only squared); `m / (v.sqrt() + eps)`
    holds two (r×b) temporaries, three with bias_correction = "inside".
    The other methods are approximated (a note says so): a dense fp32 direction (m×n) plus, for the SVD
    methods, U and Vᵀ of the thin SVD and one fp32 copy of G for the LAPACK/cuSOLVER workspace.
    """
    m, n = shape
    a, b = min(m, n), max(m, n)
    if isinstance(method, Apollo):
        r = method.rank
        rows = min(a, max(1, APOLLO_CHUNK // b))
        chunk = (2 if grad_dtype != torch.float32 else 1) * F32 * rows * b
        moments = (3 if method.bias_correction == "inside" else 2) * F32 * r * b
        held = F32 * a * r + F32 * r * b
        return max(2 * F32 * a * r, held + chunk, held + moments), 0, True
    full = F32 * m * n
    svd = F32 * (m * a + a * n) + full
    if isinstance(method, ApolloSVDMethod):
        return svd + 3 * F32 * method.rank * b, 0, False
    if isinstance(method, AliceMethod):
        return 3 * full, full, False
    return full + (svd if hasattr(method, "update_proj_gap") else full), full, False


def _grad_copy(method, grad_dtype: torch.dtype, numel: int) -> int:
    """release._grad_for: an fp32 copy of a low-precision gradient, unless the method upcasts chunk-wise."""
    if getattr(method, "accepts_low_precision_grad", False) or grad_dtype == torch.float32:
        return 0
    return F32 * numel


def int8_update_peak(shape: tuple[int, int], group_size: int, method, grad_dtype: torch.dtype, triton: bool,
                     rounding: str) -> int:
    """Updater.update_int8, beyond the gradient itself.

    1. `direction(_grad_for(grad))`: the fp32 gradient copy (if any) plus the direction's own transients.
    2. `dispatch.int8_scaled_update_`: Triton updates the codes in place; the reference (`requantize_sr_`)
       holds three fp32 buffers of one chunk of rows (weights/grid positions, uniforms, floor), one for
       nearest rounding; a dense direction stays alive meanwhile.
    """
    m, n = shape
    dir_peak, dense, _ = direction_peak(method, shape, grad_dtype)
    direction = _grad_copy(method, grad_dtype, m * n) + dir_peak
    chunk = min(m, rows_per_chunk((m, n), group_size, INT8_CHUNK)) * n
    if rounding == "stochastic":
        buffers = 0 if triton else 3
    else:
        buffers = 1
    return max(direction, dense + buffers * F32 * chunk)


def apply_update_peak(shape: tuple[int, ...], param_dtype: torch.dtype, grad_dtype: torch.dtype,
                      dense: bool) -> int:
    """optim.base.apply_update_, chunk by chunk of at most APPLY_CHUNK elements (a 1-D tensor at once).

    `update.rows()`: grad.float() (a copy when bf16) * scale -> 4 B per element (a dense fp32 direction
    is sliced as a view); `w = rows.float()` (a copy for bf16 weights); `d * lr` (4 B); a bf16 weight is
    written back by stochastic_round_to_bf16: int32 noise, bits + noise and `& mask` (4 B each) while w
    and d are still alive.
    """
    numel = math.prod(shape)
    if len(shape) > 1:
        cols = numel // shape[0]
        ce = min(numel, max(1, APPLY_CHUNK // cols) * cols)
    else:
        ce = numel
    low = param_dtype != torch.float32
    d = 0 if dense else F32 * ce
    build_d = 0 if dense else (2 if grad_dtype != torch.float32 else 1) * F32 * ce
    w = F32 * ce if low else 0
    return max(build_d, w + d + F32 * ce, w + d + 3 * F32 * ce if low else 0)


def float_update_peak(name: str, updater, device_type: str) -> int:
    """Updater.update_float, beyond the gradient itself (float_grad_clip's norms are not modelled)."""
    p = updater.floats[name]
    shape, numel, dtype = tuple(p.shape), p.numel(), p.dtype
    if name in updater.method_floats:
        method = updater.method_floats[name]
        if isinstance(method, Adam):
            # optim.adam.adam_direction (qtrain's Adam for bf16 float tensors): `m / (v.sqrt() + eps)` holds
            # two fp32 temporaries; the result is the dense direction.
            dir_peak, dense = 2 * F32 * numel, F32 * numel
        else:
            dir_peak, dense, _ = direction_peak(method, shape, dtype)
        direction = _grad_copy(method, dtype, numel) + dir_peak
        if device_type == "cuda" and updater.kernels != "torch" and dtype in (torch.float32, torch.bfloat16):
            return max(direction, dense)  # qtrain.optim.float_update: one in-place kernel, no fp32 chunks
        return max(direction, dense + apply_update_peak(shape, dtype, dtype, dense > 0))
    opt = updater.float_opts[name]
    if isinstance(opt, FusedAdamWSlot):
        # the hook only copies the gradient into the group's (persistent) buffer; the fused update runs in
        # finish_step, after backward: its flat transients (a few x 4 B per vector element) are never the peak
        return 0
    if isinstance(opt, adam8bit.Adam8bit):  # qtrain.optim.adam8bit: one in-place kernel; the reference works in chunks
        on_kernel = device_type == "cuda" and updater.kernels != "torch"
        return 0 if on_kernel else 8 * F32 * min(numel, adam8bit.BLOCK * adam8bit.CHUNK_BLOCKS)
    if isinstance(opt, torch.optim.AdamW):
        # torch _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        return 2 * numel * dtype.itemsize
    # bitsandbytes Adam8bit: the CUDA kernels update p and the states in place. The CPU fallbacks
    # (backends/cpu/ops.py) copy g (and a non-fp32 p) to fp32 and build the denominator from two
    # temporaries; the 8-bit one also dequantizes both states to fp32 (tensors >= min_8bit_size).
    if device_type == "cuda":
        return 0
    states = 2 if numel >= opt.args.min_8bit_size else 0
    return (3 + states + (dtype != torch.float32)) * F32 * numel


# ---- the phases of one step ----------------------------------------------------------------------------
def _fused_matmul(cfg: TrainConfig, device_type: str) -> bool:
    """dispatch._use_fused_matmul for this recipe: Ŵ never exists as a tensor (it takes every layout the
    Triton update kernels take)."""
    return cfg.quant.matmul == "fused" and _triton_int8(cfg, device_type)


def _triton_int8(cfg: TrainConfig, device_type: str) -> bool:
    """dispatch._use_triton for this recipe (Triton assumed installed on a CUDA machine: torch ships it).

    The layout rule is triton_kernels.check_supported's: a power-of-two group >= 8 (fp32 or bf16 metadata).
    """
    g = cfg.quant.group_size
    layout_ok = g >= 8 and not g & (g - 1)
    return device_type == "cuda" and cfg.quant.kernels != "torch" and layout_ok


class _Timeline:
    """Collects the phases and, for every non-persistent component, its kind and code path."""

    def __init__(self):
        self.phases: list[Phase] = []
        self.kinds: dict[str, tuple[str, str]] = {}

    def part(self, name: str, kind: str, code_path: str) -> str:
        self.kinds[name] = (kind, code_path)
        return name

    def add(self, name: str, parts: dict[str, int]) -> None:
        self.phases.append(Phase(name, {k: v for k, v in parts.items() if v}))


def _phases(cfg: TrainConfig, updater, device_type: str, compute: torch.dtype) -> _Timeline:
    m, t = cfg.model, cfg.train
    F = META_DTYPES[m.float_dtype]
    R = torch.promote_types(F, compute)
    s = compute.itemsize
    B, T, d, V, L = t.batch_size, t.seq_len, m.hidden_size, m.vocab_size, m.num_layers
    N = B * T
    act = activation_bytes(B=B, T=T, d=d, ff=m.intermediate_size, h=m.num_heads, kv=m.kv_heads, V=V,
                           attn=m.attn_implementation, compute=compute, float_dtype=F,
                           quantized=cfg.quant.enabled, head_dim=m.head_dim, qk_norm=m.family == "qwen3")
    triton = _triton_int8(cfg, device_type)
    release, ckpt = t.release, t.activation_checkpointing
    tl = _Timeline()
    ACT, TR = "activation", "transient"

    if ckpt:
        blocks = tl.part(f"checkpointed block inputs ({L} blocks, {B} x {T})", ACT,
                         "activation_bytes: non-reentrant checkpoint keeps each block's input")
        blocks_bytes = L * act.block_input
    else:
        blocks = tl.part(f"saved activations ({L} blocks, {m.attn_implementation}, {B} x {T})", ACT,
                         "activation_bytes: LlamaDecoderLayer + Int8Linear saved tensors")
        blocks_bytes = L * act.block
    const = tl.part("RoPE tables and token ids", ACT, "LlamaRotaryEmbedding cos/sin, batch x and y")
    mask = tl.part("causal mask (eager)", ACT, "transformers create_causal_mask for eager attention")
    base = {blocks: blocks_bytes, const: act.constant, **({mask: act.causal_mask} if ckpt else {})}
    final_norm = tl.part("final norm saved", ACT, "activation_bytes: final LlamaRMSNorm")
    lm_in = tl.part("lm_head saved input" + (" + autocast weight copy" if act.lm_head_weight_copy else ""),
                    ACT, "activation_bytes: lm_head (nn.Linear) under autocast")
    lsm = tl.part("log-softmax output (fp32)", ACT, "train.lm_loss -> F.cross_entropy saves log_softmax")
    head = {final_norm: act.final_norm, lm_in: act.lm_head_input + act.lm_head_weight_copy}

    # The projections of one block (all blocks are alike), in backward order (reverse forward order):
    # int8 layers dequantize in forward and again in backward, then dW and, with release, its update inside
    # the hook; float projections (quant.enabled = false) get dW in c, autocast's cast to F, update_float.
    block_layers = [l for n, l in updater.int8.items() if ".layers.0." in n][::-1]
    block_floats = [n for n in updater.floats
                    if ".layers.0." in n and is_quantized_projection(n.removesuffix(".weight"))][::-1]
    fused = _fused_matmul(cfg, device_type)  # then no layer holds a dequantized Ŵ, forward or backward
    deq_peak = (lambda shape: 0) if fused else (lambda shape: dequantize_peak(shape, compute, triton))
    fwd = max((deq_peak(tuple(l.codes.shape)) for l in block_layers), default=0)

    # Int8Linear.receive_grad: one micro-batch leaves dW in the compute dtype; accumulation sums in fp32
    held_int8_bytes = F32 if cfg.train.grad_accum_steps > 1 else s

    def weight_backward(name: str) -> tuple[int, int]:
        """(peak bytes beyond the activations while this projection back-propagates, gradient it leaves)."""
        if name in updater.int8:
            layer = updater.int8[name]
            shape = tuple(layer.codes.shape)
            mn, dx = shape[0] * shape[1], s * N * shape[1]
            during = max(deq_peak(shape), s * mn + dx)
            upd = int8_update_peak(shape, layer.group_size, updater.matrix_method, compute, triton,
                                   cfg.quant.rounding) if release else 0
            return max(during, dx + s * mn + upd), held_int8_bytes * mn
        p = updater.floats[name]
        grad, dx = p.numel() * p.element_size(), s * N * p.shape[1]
        cast = s * p.numel() + grad if p.dtype != compute else grad
        return dx + max(cast, grad + (float_update_peak(name, updater, device_type) if release else 0)), grad

    weights = [l.name for l in block_layers] + block_floats

    # Forward, last block: at down_proj's dequantize (the MLP weights are the largest) everything saved so
    # far is alive; eager attention peaks earlier, at softmax, with the masked scores beside the block's
    # first half. A checkpointed block saves nothing in forward: its input, the norm and the MLP product.
    deq = tl.part("dequantized weight / attention scores (forward)", TR, "dequantize_peak; eager softmax")
    if ckpt:
        tl.add("forward (last block)", {**base, tl.part("checkpointed block's forward (norm out, MLP product)", TR,
                                                        "LlamaDecoderLayer.forward under checkpoint"):
                                        act.norm + act.mlp_unit, deq: max(fwd, 2 * act.attn_scores)})
    else:
        at_softmax = act.alive_at("o_proj") - act.block + act.attn_scores  # relative to all blocks saved
        tl.add("forward (last block)", {blocks: blocks_bytes, const: act.constant, mask: act.causal_mask,
                                        deq: max(fwd, at_softmax)})
    logits = tl.part("logits and loss (fp32 upcast in lm_loss)", TR,
                     "train.lm_loss: logits, logits.float(), log_softmax and its backward")
    # lm_loss forward: logits (c) and their fp32 copy (unless c is fp32) while log_softmax runs.
    tl.add("loss forward", {**base, **head, lsm: act.log_softmax,
                            logits: act.logits + (F32 * N * V if compute != torch.float32 else 0)})
    # loss.backward: nll_loss_backward's dense fp32 gradient and _log_softmax_backward_data's output.
    tl.add("loss backward", {**base, **head, lsm: act.log_softmax, logits: 2 * F32 * N * V})

    lm = next((n for n in updater.floats if n.startswith("lm_head")), None)
    if lm is not None:
        numel = updater.floats[lm].numel()
        dW_c, grad = s * numel, F.itemsize * numel
        # lm_head backward: dlogits (c) -> dX (sNd) and dW (c); autocast's cast of dW to F (both alive);
        # AccumulateGrad, then the release hook updates lm_head while dX waits for the final norm.
        mm = act.logits + s * N * d + dW_c + act.lm_head_input + act.lm_head_weight_copy
        cast = s * N * d + dW_c + grad if F != compute else 0
        hook = s * N * d + grad + (float_update_peak(lm, updater, device_type) if release else 0)
        tl.add("lm_head backward" + (" + update" if release else ""), {
            **base, final_norm: act.final_norm,
            tl.part("lm_head gradient" + (" + update" if release else ""), TR,
                    "lm_head backward; Updater.update_float (float_update_peak)"): max(mm, cast, hook)})

    # Block backward, from the last block down. With release every gradient is freed in its hook, so the
    # last block (all activations still alive) is the worst; without release the gradients pile up while
    # the activations are freed, so every block is a candidate.
    grads_in_flight = R.itemsize * N * d + (s * N * d if R != compute else 0)
    head_grads = sum(p.numel() * p.element_size() for n, p in updater.floats.items()
                     if ".layers." not in n and not n.endswith("embed_tokens.weight"))
    block_grads = sum(p.numel() * p.element_size() for n, p in updater.floats.items() if ".layers.0." in n
                      and n not in block_floats) + sum(weight_backward(n)[1] for n in weights)
    best = (0, "none", L - 1, 0, 0, 0)  # (phase bytes, projection, block, activations, held gradients, peak)
    for block in reversed(range(L)):
        before = block * (act.block_input if ckpt else act.block)  # blocks not reached yet
        held = 0 if release else head_grads + (L - 1 - block) * block_grads
        for name in weights:
            projection = name.removesuffix(".weight").rsplit(".", 1)[-1]
            acts = before + (act.block_input if ckpt else 0) + act.alive_at(projection, recomputed=ckpt)
            peak, grad = weight_backward(name)
            if acts + held + peak > best[0]:
                best = (acts + held + peak, projection, block, acts, held, peak)
            held += 0 if release else grad
            if projection == "down_proj":  # then silu(gate) * up's backward: dX and two (B, T, ff) gradients
                acts = before + (act.block_input if ckpt else 0) + act.alive_at("down_proj", recomputed=ckpt)
                acts -= act.mlp_unit  # the product, down_proj's saved input, is freed
                peak = 3 * act.mlp_unit
                if acts + held + peak > best[0]:
                    best = (acts + held + peak, "silu(gate) * up", block, acts, held, peak)
        if release:
            break
    _, bwd_name, bwd_block, acts, held, bwd = best
    tl.add(f"block backward (block {bwd_block}, {bwd_name})", {
        tl.part(f"activations alive in backward (blocks 0-{bwd_block}{', checkpointed' if ckpt else ''})", ACT,
                "activation_bytes + Activations.alive_at: saved tensors not yet consumed"): acts,
        const: act.constant,
        **({mask: act.causal_mask} if ckpt else {}),
        tl.part("gradients held (release = false)", TR, "Int8Linear.weight_grad and .grad, kept to the step"): held,
        tl.part("activation gradients in flight", TR, "residual-stream gradient (+ its compute-dtype copy)"):
            grads_in_flight,
        tl.part(f"projection backward ({bwd_name}: dequantized weight, dX, dW{' + update' if release else ''})",
                TR, "_Int8LinearFn.backward; Updater.update_int8 (int8_update_peak)"): bwd,
    })
    emb = next((n for n in updater.floats if n.endswith("embed_tokens.weight")), None)
    if release and emb is not None:
        p = updater.floats[emb]
        tl.add("embedding backward + update", {
            const: act.constant,
            tl.part("embedding gradient + update", TR, "embedding backward; Updater.update_float (float_update_peak)"):
                p.numel() * p.element_size() + float_update_peak(emb, updater, device_type)})
    if not release:
        # Updater.finish_step: every gradient is alive after backward and is freed after its own update.
        grads = {n: l.codes.numel() * held_int8_bytes for n, l in updater.int8.items()}
        grads.update({n: p.numel() * p.element_size() for n, p in updater.floats.items()})
        updates = [(n, int8_update_peak(tuple(l.codes.shape), l.group_size, updater.matrix_method, compute,
                                        triton, cfg.quant.rounding)) for n, l in updater.int8.items()]
        updates += [(n, float_update_peak(n, updater, device_type)) for n in updater.floats]
        total = live = peak = sum(grads.values())
        at = ""
        for name, upd in updates:  # finish_step's order: int8 layers, then float tensors
            if live + upd > peak:
                peak, at = live + upd, name
            live -= grads[name]
        tl.add("updates after backward (release = false)", {
            const: act.constant,
            tl.part("all gradients (release = false)", TR, "Int8Linear.weight_grad and .grad of every float tensor"):
                total,
            tl.part(f"update transient ({at})", TR, "Updater.finish_step -> update_int8 / update_float"): peak - total,
        })
    return tl


# ---- the estimate ----------------------------------------------------------------------------------------
def _notes(cfg: TrainConfig, updater, device_type: str, compute: torch.dtype) -> list[str]:
    m, t = cfg.model, cfg.train
    notes = []
    if cfg.optim.float_grad_clip > 0:
        notes.append("optim.float_grad_clip > 0: the per-tensor clip's norm temporaries are not modelled (small)")
    if m.tie_embeddings:
        notes.append("model.tie_embeddings = true: the shared weight is one tensor, modelled at the embedding's "
                     "update; its lm_head-side gradient and autocast copy are not modelled separately")
    if not cfg.quant.enabled:
        notes.append("quant.enabled = false: the float projections' saved autocast weight copies are counted "
                     "whole until their block's backward ends (an upper bound)")
    if t.grad_accum_steps > 1:
        notes.append(f"train.grad_accum_steps = {t.grad_accum_steps}: activations are one micro-batch's; "
                     "gradients accumulate in place")
    if not direction_peak(updater.matrix_method, (8, 16), compute)[2]:
        notes.append(f"optim.method = {cfg.optim.method!r}: its direction transients (dense update, SVD at a "
                     "projection refresh) are approximated; APOLLO / APOLLO-Mini are exact")
    a = activation_bytes(B=t.batch_size, T=t.seq_len, d=m.hidden_size, ff=m.intermediate_size, h=m.num_heads,
                         kv=m.kv_heads, V=m.vocab_size, attn=m.attn_implementation, compute=compute,
                         float_dtype=META_DTYPES[m.float_dtype], head_dim=m.head_dim, qk_norm=m.family == "qwen3")
    notes.append(f"block activations for {t.batch_size} x {t.seq_len}: {m.num_layers * a.block / GiB:.3f} GiB without "
                 f"checkpointing, {(m.num_layers * a.block_input + a.recomputed_block) / GiB:.3f} GiB with "
                 f"(block inputs + one recomputed block)")
    if device_type == "cuda":
        kernels = ("Triton (fused, no fp32 transients; assumes triton is installed)" if _triton_int8(cfg, device_type)
                   else "torch reference (chunked fp32 transients)")
        notes.append(f"int8 dequantize/update kernels: {kernels}")
        notes.append("int8 matmul: " + ("fused Triton dequant-GEMM (no dequantized weight)"
                                        if _fused_matmul(cfg, device_type) else "dequantize, then GEMM"))
        notes.append(f"CUDA context ({CUDA_CONTEXT_BYTES / MiB:.0f} MiB) and allocator fragmentation "
                     f"({ALLOCATOR_SLACK:.0%} of the step's transients) are assumptions, not measured yet")
    notes.append("evaluation and text sampling run under no_grad and stay below a training step (not modelled)")
    return notes


def _load(recipe_or_cfg) -> tuple[TrainConfig, str]:
    if isinstance(recipe_or_cfg, TrainConfig):
        return recipe_or_cfg, "<TrainConfig>"
    path = Path(recipe_or_cfg)
    if not path.is_file():
        path = find_recipe(str(recipe_or_cfg))  # shipped names: "7b", "60m", ...
    return TrainConfig.from_toml(path), str(path)


def estimate(recipe_or_cfg: TrainConfig | str | Path, device_type: str = "cuda", nproc: int = 1,
             fsdp: bool = False) -> Breakdown:
    """Predicted peak memory of one training step; `recipe_or_cfg` is a TrainConfig, a recipe path or name.

    nproc: data-parallel processes (one GPU each). Weights and optimizer states are replicated and each
    gradient is all-reduced in place inside its release hook (qtrain.parallel.distributed), so the per-GPU figure is
    the single-GPU one plus NCCL's communication buffers; nothing is sharded.
    fsdp (with nproc > 1, qtrain.parallel.fsdp): every persistent tensor counts one rank's shard, and the step adds
    what FSDP2 holds beyond one GPU's run: the largest unit gathered (and the next one prefetched) with its
    gradients and the reduce-scatter's copy of them (see fsdp_unit_bytes).

    device_type "cuda": bf16 compute for dtype = "auto", Triton int8 kernels, bitsandbytes' CUDA kernels,
    allocator rounding and CUDA context. "cpu": fp32 for "auto", the torch references, no allocator
    overhead (what tests/test_estimate.py measures with the profiler).
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type = {device_type!r}; use 'cuda' or 'cpu'")
    cfg, source = _load(recipe_or_cfg)
    autocast = autocast_dtype(cfg.train.dtype, torch.device(device_type))
    compute = autocast if autocast != torch.float32 else META_DTYPES[cfg.model.float_dtype]
    shards = nproc if fsdp and nproc > 1 else 1
    updater, comps, persistent_tensors = _persistent(cfg, device_type, shards)
    tl = _phases(cfg, updater, device_type, compute)
    for name, (kind, code_path) in tl.kinds.items():
        biggest = max((p.parts.get(name, 0) for p in tl.phases), default=0)
        if biggest:
            comps.append(Component(name, biggest, kind, code_path))
    peak_phase = max(tl.phases, key=lambda p: p.bytes)
    if device_type == "cuda":
        rounding = sum(_cuda_block_bytes(t.numel() * t.element_size()) - t.numel() * t.element_size()
                       for t in persistent_tensors)
        slack, context = int(ALLOCATOR_SLACK * peak_phase.bytes), CUDA_CONTEXT_BYTES
    else:
        rounding = slack = context = 0
    comps += [
        Component("allocator rounding of persistent blocks (in allocated)", rounding, "overhead",
                  "CUDACachingAllocator: 512 B blocks, unsplit < 1 MiB tails of large segments"),
        Component("allocator fragmentation (reserved - allocated)", slack, "overhead",
                  "CUDACachingAllocator: cached blocks not reusable for later sizes (assumed share)"),
        Component("CUDA context (outside max_memory_allocated)", context, "overhead", "cuda init, cuBLAS/cuDNN"),
        Component("communication buffers (outside max_memory_allocated)",
                  NCCL_BUFFER_BYTES if device_type == "cuda" and nproc > 1 else 0, "overhead",
                  "qtrain.parallel.distributed: in-place all_reduce of each gradient; NCCL's own buffers"),
    ]
    # Data parallel with release and dp_overlap: up to dp_overlap gradients wait for their all-reduce while
    # backward goes on (qtrain.parallel.distributed.OverlappedReducer). Bounded by that many of the largest gradient
    # (an upper bound: which gradients are in flight at the peak is not modelled).
    in_flight = 0
    if nproc > 1 and cfg.train.release and cfg.train.dp_overlap > 0:
        grads = [l.codes.numel() * compute.itemsize for l in updater.int8.values()]
        grads += [p.numel() * p.element_size() for p in updater.floats.values()]
        in_flight = cfg.train.dp_overlap * max(grads)
    if shards > 1:
        in_flight = 0  # FSDP2 reduce-scatters; nothing waits for an all-reduce
    comps.append(Component("gradients awaiting their all-reduce (data parallel, upper bound)", in_flight,
                           "transient", "OverlappedReducer: [train] dp_overlap gradients in flight"))
    gathered = fsdp_unit_bytes(cfg, updater, shards) if shards > 1 else 0
    comps.append(Component("FSDP2 gathered unit + prefetch, its gradients and reduce-scatter buffers",
                           gathered, "transient", "fully_shard units (qtrain.parallel.fsdp): see estimate.fsdp_unit_bytes"))
    persistent = sum(c.bytes for c in comps if c.kind == "persistent")
    peak_allocated = persistent + rounding + peak_phase.bytes + in_flight + gathered
    return Breakdown(
        recipe=source, device_type=device_type, compute_dtype=str(compute).removeprefix("torch."),
        components=comps, phases=tl.phases, persistent_bytes=persistent, peak_allocated=peak_allocated,
        peak_reserved=peak_allocated + slack,
        total_on_gpu=peak_allocated + slack + context + (NCCL_BUFFER_BYTES if device_type == "cuda" and nproc > 1 else 0),
        peak_phase=peak_phase.name, peak_component=max(peak_phase.parts.items(), key=lambda kv: kv[1])[0],
        largest_component=max((c for c in comps if c.kind != "overhead"), key=lambda c: c.bytes).name,
        notes=_notes(cfg, updater, device_type, compute) + (_fsdp_notes(cfg, shards) if shards > 1 else []),
    )


def _fsdp_notes(cfg: TrainConfig, shards: int) -> list[str]:
    from qtrain.parallel.fsdp import problems  # the trainer's own checks, on a meta model

    found = problems(cfg, build_model(cfg.model, cfg.quant, META), shards)
    note = (f"FSDP2 over {shards} ranks: weights, float tensors and optimizer states are this rank's shards; "
            f"the gathered unit is an upper bound (one projection's gradient is counted twice)")
    return [note] + [f"qtrain train --fsdp refuses this recipe as it stands: {p}" for p in found]


def fsdp_unit_bytes(cfg: TrainConfig, updater, shards: int) -> int:
    """What FSDP2 holds beyond a one-GPU step, at its largest unit (qtrain.parallel.fsdp: one unit per block, the
    embedding and lm_head one each). A block: its int8 weights gathered, twice (the next block's all-gather is
    prefetched), the dW of all its projections (in the float tensors' dtype, which an Int8Weight presents),
    alive until the block's reduce-scatter, the reduce-scatter's input copy of them and its 1/shards output.
    The embedding or lm_head: the gathered float weight and the reduce-scatter's copy and output of its
    gradient (the gradient itself is the one-GPU run's). An upper bound: the one-GPU phases already count one
    projection's gradient."""
    block = [l for n, l in updater.int8.items() if ".layers.0." in n]
    weights = sum(t.numel() * t.element_size() for l in block for t in (l.codes, l.scale, l.offset))
    g = META_DTYPES[cfg.model.float_dtype].itemsize
    grads = sum(l.codes.numel() * g for l in block)
    unit = 2 * weights + grads * (2 + 1 / shards)
    for name, p in updater.floats.items():
        if p.dim() == 2 and ".layers." not in name:  # embedding, lm_head
            unit = max(unit, p.numel() * p.element_size() * (2 + 1 / shards))
    return int(unit)


# ---- report ---------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / GiB:7.3f} GiB" if n >= GiB else f"{n / MiB:7.1f} MiB"


def format_breakdown(b: Breakdown) -> str:
    lines = [f"qtrain estimate: {b.recipe}", f"device {b.device_type}, compute dtype {b.compute_dtype}", ""]
    width = max(len(c.name) for c in b.components + [Component(p.name, 0, "", "") for p in b.phases]) + 2
    lines.append(f"  {'component':<{width}}{'bytes':>11}  {'kind':<11} models")
    for kind in ("persistent", "activation", "transient", "overhead"):
        lines += [f"  {c.name:<{width}}{_size(c.bytes)}  {kind:<11} {c.code_path}" for c in b.components
                  if c.kind == kind]
    lines += ["", "  phases of one step (non-persistent bytes alive):"]
    lines += [f"  {p.name:<{width}}{_size(p.bytes)}" + ("  <- peak" if p.name == b.peak_phase else "")
              for p in b.phases]
    lines += [
        "",
        f"  {'persistent':<{width}}{_size(b.persistent_bytes)}",
        f"  {'peak allocated':<{width}}{_size(b.peak_allocated)}  torch.cuda.max_memory_allocated",
        f"  {'peak reserved':<{width}}{_size(b.peak_reserved)}  torch.cuda.max_memory_reserved",
        f"  {'total on the GPU':<{width}}{_size(b.total_on_gpu)}  reserved + CUDA context (nvidia-smi)",
        f"  peak phase: {b.peak_phase}; its largest component: {b.peak_component}",
        f"  largest component: {b.largest_component}",
    ]
    if b.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in b.notes]
    return "\n".join(lines)


def _changes_to_try(cfg: TrainConfig) -> list[list[str]]:
    """Recipe changes for --gpu-gib, in the order they are tried (each added to the ones before)."""
    steps: list[list[str]] = []
    if not cfg.train.activation_checkpointing:
        steps.append(["train.activation_checkpointing=true"])
    B = cfg.train.batch_size
    while B > 1:
        B //= 2
        steps.append([f"train.batch_size={B}"])
    T = cfg.train.seq_len
    while T > 64:
        T //= 2
        steps.append([f"train.seq_len={T}"])
    if cfg.quant.meta_dtype != "bfloat16":
        steps.append(["quant.meta_dtype=bfloat16"])
    if cfg.model.float_dtype != "bfloat16":
        steps.append(["model.float_dtype=bfloat16"])
    if "same_as_matrices" != cfg.optim.embedding_optimizer or "same_as_matrices" != cfg.optim.lm_head_optimizer:
        steps.append(["optim.embedding_optimizer=same_as_matrices", "optim.lm_head_optimizer=same_as_matrices"])
    return steps


def fit_gpu(cfg: TrainConfig, gpu_gib: float, b: Breakdown) -> dict:
    """Does the recipe fit in gpu_gib (total on the GPU)? If not, the first change list that fits."""
    budget = int(gpu_gib * GiB)
    fit = {"gpu_gib": gpu_gib, "fits": b.total_on_gpu <= budget, "total_on_gpu": b.total_on_gpu,
           "set": [], "total_after": b.total_on_gpu}
    if fit["fits"]:
        return fit
    changes: list[str] = []
    for step in _changes_to_try(cfg):
        keys = {c.split("=")[0] for c in step}
        changes = [c for c in changes if c.split("=")[0] not in keys] + step
        trial = estimate(cfg.apply_overrides(changes), b.device_type)
        fit["total_after"] = trial.total_on_gpu
        if trial.total_on_gpu <= budget:
            break
    else:
        fit["set"] = None  # nothing tried fits
        return fit
    for change in list(changes[:-1]):  # drop the earlier changes the fit does not need (the last one it does)
        fewer = [c for c in changes if c != change]
        trial = estimate(cfg.apply_overrides(fewer), b.device_type)
        if trial.total_on_gpu <= budget:
            changes, fit["total_after"] = fewer, trial.total_on_gpu
    fit["set"] = changes
    return fit


def format_fit(fit: dict) -> str:
    head = f"\n--gpu-gib {fit['gpu_gib']:g}: "
    if fit["fits"]:
        return head + f"fits ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU)"
    if fit["set"] is None:
        return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU) and no tried change fits; "
                       f"the leanest tried needs {fit['total_after'] / GiB:.2f} GiB")
    flags = " ".join(f"--set {c}" for c in fit["set"])
    return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU); with these changes it "
                   f"needs {fit['total_after'] / GiB:.2f} GiB:\n  {flags}")
