"""Peak memory of one training step of a recipe, predicted before it runs (`qtrain estimate`).

Persistent bytes come from the trainer's own constructors on the meta device (qtrain.estimate.persistent), never
from formulas. Only what lives during a step is modelled: saved activations (one formula,
qtrain.estimate.activations) and transients, which each method, the kernel dispatch and the loss report for
their own code paths (qtrain.estimate.transients). A step is a sequence of phases (qtrain.estimate.phases); the
predicted peak is the persistent bytes plus the largest phase, plus what several processes add
(qtrain.estimate.parallel). The CUDA allocator and context: qtrain.estimate.overhead. Reports and --gpu-gib:
qtrain.estimate.report, qtrain.estimate.fit.

    from qtrain.estimate.memory import estimate
    b = estimate("recipes/7b.toml")              # or a TrainConfig; device_type="cpu" for a CPU run
    print(b.peak_allocated / 2**30, b.peak_phase, b.peak_component)
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtrain.checkpoint.store import save_transient_note
from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype
from qtrain.estimate.activations import activation_bytes
from qtrain.estimate.breakdown import Breakdown, Component, GiB, MiB
from qtrain.estimate.overhead import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, allocator_components
from qtrain.estimate.parallel import NCCL_BUFFER_BYTES, fsdp_notes, parallel_components
from qtrain.estimate.persistent import _step_float_optimizers_on_meta, persistent
from qtrain.estimate.phases import Step, phases
from qtrain.model.builder import META_DTYPES
from qtrain.model.loss import vocab_chunk

# the names earlier callers imported from this module
__all__ = ["GiB", "MiB", "NCCL_BUFFER_BYTES", "Breakdown", "Component", "_step_float_optimizers_on_meta",
           "activation_bytes", "estimate"]


def estimate(recipe_or_cfg: TrainConfig | str | Path, device_type: str = "cuda", nproc: int = 1,
             fsdp: bool = False) -> Breakdown:
    """Predicted peak memory of one training step; `recipe_or_cfg` is a TrainConfig, a recipe path or name.

    nproc: data-parallel processes (one GPU each); fsdp (with nproc > 1): FSDP2 shards every persistent tensor
    (qtrain.estimate.parallel says what each adds per GPU).

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
    kept = persistent(cfg, device_type, shards)
    step = phases(cfg, kept.updater, device_type, compute, sharded=shards > 1)
    comps = list(kept.components)
    for name, (kind, code_path) in step.tl.kinds.items():
        biggest = max((p.parts.get(name, 0) for p in step.tl.phases), default=0)
        if biggest:
            comps.append(Component(name, biggest, kind, code_path))
    peak_phase = max(step.tl.phases, key=lambda p: p.bytes)
    overhead = allocator_components(device_type, kept.tensors, peak_phase.bytes)
    extra = parallel_components(cfg, kept.updater, device_type, nproc, shards, compute.itemsize)
    comps += overhead + extra
    rounding, slack, context = (c.bytes for c in overhead)
    beside = sum(c.bytes for c in extra if c.kind == "transient")  # alive at the peak (upper bounds)
    outside = sum(c.bytes for c in extra if c.kind == "overhead")  # outside the torch allocator
    peak_allocated = kept.bytes + rounding + peak_phase.bytes + beside
    return Breakdown(
        recipe=source, device_type=device_type, compute_dtype=str(compute).removeprefix("torch."),
        components=comps, phases=step.tl.phases, persistent_bytes=kept.bytes, peak_allocated=peak_allocated,
        peak_reserved=peak_allocated + slack, total_on_gpu=peak_allocated + slack + context + outside,
        peak_phase=peak_phase.name, peak_component=max(peak_phase.parts.items(), key=lambda kv: kv[1])[0],
        largest_component=max((c for c in comps if c.kind != "overhead"), key=lambda c: c.bytes).name,
        notes=_notes(step) + (fsdp_notes(cfg, shards) + [save_transient_note(kept.tensors, shards, device_type)]
                              if shards > 1 else []), nproc=nproc, fsdp=fsdp,
    )


def _notes(st: Step) -> list[str]:
    cfg, m, t = st.cfg, st.cfg.model, st.cfg.train
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
    if not st.updater.matrix_method.direction_bytes((8, 16), st.compute).exact:
        notes.append(f"optim.method = {cfg.optim.method!r}: its direction transients (dense update, SVD at a "
                     "projection refresh) are approximated; APOLLO / APOLLO-Mini are exact")
    a = st.act
    notes.append(f"block activations for {t.batch_size} x {t.seq_len}: {m.num_layers * a.block / GiB:.3f} GiB without "
                 f"checkpointing, {(m.num_layers * a.block_input + a.recomputed_block) / GiB:.3f} GiB with "
                 f"(block inputs + one recomputed block)")
    width = vocab_chunk(st.N, st.V)
    notes.append(f"loss: {st.N} x {st.V} logits " + (f"in {-(-st.V // width)} chunks of {width} columns (no "
                 "full-size fp32 logits; lm_head's forward runs twice)" if width < st.V else "in one piece"))
    if st.device_type == "cuda":
        plans = [st.plan(l) for l in st.block_layers]
        kernels = ("Triton (fused, no fp32 transients; assumes triton is installed)" if any(p.triton for p in plans)
                   else "torch reference (chunked fp32 transients)")
        notes.append(f"int8 dequantize/update kernels: {kernels}")
        notes.append("int8 matmul: " + ("fused Triton dequant-GEMM (no dequantized weight)"
                                        if any(p.fused_matmul for p in plans) else "dequantize, then GEMM"))
        notes.append(f"CUDA context ({CUDA_CONTEXT_BYTES / MiB:.0f} MiB) and allocator fragmentation "
                     f"({ALLOCATOR_SLACK:.0%} of the step's transients) are assumptions, not measured yet")
    notes.append("evaluation and text sampling run under no_grad between steps, in what is free then: at most a "
                 "quarter for logits, half of the rest for dequantized weights (not modelled)")
    return notes


def _load(recipe_or_cfg) -> tuple[TrainConfig, str]:
    if isinstance(recipe_or_cfg, TrainConfig):
        return recipe_or_cfg, "<TrainConfig>"
    path = Path(recipe_or_cfg)
    if not path.is_file():
        path = find_recipe(str(recipe_or_cfg))  # shipped names: "7b", "60m", ...
    return TrainConfig.from_toml(path), str(path)

