"""Device operations (kernel launches on CUDA) of one training step of a recipe, counted on the CPU.

    python tools/count_launches.py 7b                   # launches per eager step, with a per-layer breakdown
    python tools/count_launches.py 7b-8gb --json        # one JSON object
    python tools/count_launches.py 7b --set quant.matmul=fused --seq-len 256   # fused GEMM: only from 64 rows on
    python tools/count_launches.py 7b --profile cuda    # on a GPU: the real step under torch.profiler (gpu_check.sh)

The counting lives in qtrain/update/launch_count.py (the tests use it too). What is counted: one release step as
`qtrain.train.loop.fit` runs it (begin_step, the loss, backward with every update inside its release hook,
finish_step, the gradient-norm meter's launches and its take(), the step-loss accumulation),
at the recipe's real widths, vocabulary and optimizer choices, batch 1 x --seq-len tokens (launch counts do
not depend on the number of tokens, except that dispatch picks the fused dequant-GEMM of [quant] matmul =
"fused" only from 64 rows on), autocast in the recipe's CUDA compute dtype (bf16 for dtype "auto").
  - Every ATen operator that reaches the dispatcher under a TorchDispatchMode counts as one launch, except
    views and other aliasing ops (their schema returns an alias that is not written), allocations (empty*),
    and metadata ops (set_, resize_). Custom ops (bitsandbytes' optimizer kernels) count once.
  - The code takes its CUDA decisions: dispatch.use_triton / _use_triton answer as for CUDA tensors, so the
    Triton paths run their real Python wrappers; each `kernel[grid](...)` launch counts once and does not run
    (outputs stay uninitialised: no step decision depends on a tensor value, tests/test_step_syncs.py).
  - Layers: the step is counted at --layers (default 1 and 2) and extrapolated linearly to the recipe's
    num_layers: per layer = c(2) - c(1), fixed = c(1) - per layer. The third step is counted (the first
    creates lazy state; --steps).
Not modelled (CUDA launches more or fewer than ops here): a cuBLAS GEMM may add a split-K reduction kernel;
ops on tensors that live on the CPU even in a CUDA run (torch AdamW's `step` counter) count although they
launch nothing; multi-tensor `_foreach_*` ops count once (CUDA: one launch per ~36-110 tensors); CPU and
CUDA autocast differ by a few casts. Host syncs seen in the counted step are reported too (qtrain/core/sync_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

if __name__ == "__main__":  # the compiled-mode wrappers run (their launches are counted, never executed)
    os.environ.pop("TRITON_INTERPRET", None)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype
from qtrain.update.launch_count import PHASES, count_step, recipe_cfg, step_function

RUNTIME_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                  "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
RUNTIME_SYNC = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cuCtxSynchronize",
                "cuStreamSynchronize", "cuEventSynchronize")


def profile_step(cfg: TrainConfig, steps: int, device: torch.device, top: int = 15) -> dict:
    """One real step of the full recipe on device under torch.profiler (after steps - 1 warm-up steps):
    kernels and runtime launch calls, runtime syncs, GPU-busy time (union of kernel intervals) vs wall time,
    the top kernels by GPU time, and the syncs qtrain.core.sync_probe counts in one more step."""
    from torch.profiler import ProfilerActivity, profile

    from qtrain.core.sync_probe import count_syncs

    step = step_function(cfg, [None], device)
    cuda = device.type == "cuda"
    for _ in range(steps - 1):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        host_s = time.perf_counter() - t0  # the host is done queueing here (no sync inside a step)
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t0
    events = prof.events()
    device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
    copies = [e for e in device_events if e.name.startswith(("Memcpy", "Memset"))]
    runtime = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU
                      and e.name.startswith(("cuda", "cu")))
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels + copies)
    busy, end = 0.0, float("-inf")
    for a, b in intervals:  # union of intervals (us): concurrent kernels count once
        if b > end:
            busy += b - max(a, end)
            end = b
    by_kernel: Counter[str] = Counter()
    for e in kernels:
        by_kernel[e.name[:80]] += e.time_range.end - e.time_range.start
    syncs = count_syncs(step) if cuda else None
    return {
        "kernels": len(kernels), "memcpy_memset": len(copies),
        "runtime_launch_calls": sum(v for k, v in runtime.items() if k.startswith(RUNTIME_LAUNCH)),
        "runtime_sync_calls": {k: v for k, v in runtime.items() if k.startswith(RUNTIME_SYNC)},
        "wall_ms": round(wall_s * 1e3, 2), "host_ms": round(host_s * 1e3, 2), "gpu_busy_ms": round(busy / 1e3, 2),
        "gpu_busy_fraction": round(busy / 1e3 / (wall_s * 1e3), 3) if wall_s else None,
        "top_kernels_ms": [(k, round(v / 1e3, 3)) for k, v in by_kernel.most_common(top)],
        "syncs": None if syncs is None else {"implicit": syncs.implicit, "explicit": syncs.explicit,
                                             "where": syncs.where[:10]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="a shipped recipe (tiny, 60m, ..., 7b, 7b-8gb) or a recipe file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override, repeatable (e.g. quant.matmul=fused)")
    p.add_argument("--layers", default="1,2", help="the two layer counts to count and extrapolate from")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per step, 1 sequence (default 16: counts do not depend on it; --profile: the recipe's)")
    p.add_argument("--steps", type=int, default=3, help="the step counted (earlier ones create lazy state)")
    p.add_argument("--top", type=int, default=15, help="most frequent ops to list")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--profile", choices=("cuda", "cpu"), default=None,
                   help="instead: run one real step of the full recipe (its batch x seq_len, or --seq-len) on this "
                        "device under torch.profiler: kernels launched, runtime syncs, GPU-busy vs wall time, top "
                        "kernels (cpu: a dry run of the same code, no device events)")
    args = p.parse_args()
    args.seq_len_set, args.seq_len = args.seq_len is not None, args.seq_len or 16
    full = TrainConfig.from_toml(find_recipe(args.recipe), args.overrides)
    if args.profile:
        device = torch.device(args.profile)
        cfg = full.apply_overrides([f"train.device={device.type}", "train.grad_accum_steps=1"]
                                   + ([f"train.seq_len={args.seq_len}"] if args.seq_len_set else []))
        result = {"recipe": args.recipe, "overrides": args.overrides, "device": device.type,
                  "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "num_layers": cfg.model.num_layers,
                  **profile_step(cfg, args.steps, device, args.top)}
        print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
        return
    L = full.model.num_layers
    lo, hi = (int(v) for v in args.layers.split(","))
    t0 = time.perf_counter()
    counts = {}
    for n in (lo, hi):
        counts[n] = count_step(recipe_cfg(args.recipe, args.overrides, n, args.seq_len), args.steps)
    (c_lo, s_lo), (c_hi, s_hi) = counts[lo], counts[hi]
    per_layer = (c_hi.total - c_lo.total) / (hi - lo)
    fixed = c_lo.total - lo * per_layer
    total = fixed + L * per_layer
    phase_total = {ph: (c_lo.by_phase[ph] + (L - lo) * (c_hi.by_phase[ph] - c_lo.by_phase[ph]) / (hi - lo))
                   for ph in PHASES}
    op_total = {op: c_lo.by_op[op] + (L - lo) * (c_hi.by_op[op] - c_lo.by_op[op]) / (hi - lo)
                for op in set(c_lo.by_op) | set(c_hi.by_op)}
    triton = sum(v for op, v in op_total.items() if op.startswith("triton::"))
    syncs = {"implicit": s_hi.implicit, "explicit": s_hi.explicit, "where": s_hi.where[:10],
             "syncing_ops": dict(c_hi.syncing_ops)}
    # syncs scale with layers too (one explicit sync per bitsandbytes-stepped tensor)
    sync_per_layer = (s_hi.total - s_lo.total) / (hi - lo)
    sync_total = s_lo.total + (L - lo) * sync_per_layer
    o = full.optim
    result = {
        "recipe": args.recipe, "overrides": args.overrides, "num_layers": L, "tokens": args.seq_len,
        "launches_per_step": round(total), "per_layer": per_layer, "fixed": fixed, "triton_launches": round(triton),
        "by_phase": {k: round(v) for k, v in phase_total.items()},
        "top_ops": sorted(((op, round(v)) for op, v in op_total.items()), key=lambda kv: -kv[1])[:args.top],
        "syncs_per_step": round(sync_total), "syncs_counted_step": syncs,
        "settings": {"method": o.method, "float_optimizer": o.float_optimizer, "lm_head": o.lm_head_optimizer,
                     "embedding": o.embedding_optimizer, "float_dtype": full.model.float_dtype,
                     "checkpointing": full.train.activation_checkpointing, "release": full.train.release,
                     "matmul": full.quant.matmul, "kernels": full.quant.kernels,
                     "compute": str(autocast_dtype(full.train.dtype, torch.device("cuda"))).removeprefix("torch.")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    s = result["settings"]
    print(f"{args.recipe}: {L} layers, {s['method']}, float tensors {s['float_dtype']} with {s['float_optimizer']} "
          f"(lm_head {s['lm_head']}, embedding {s['embedding']}), release {s['release']}, checkpointing "
          f"{s['checkpointing']}, matmul {s['matmul']}, compute {s['compute']}; counted at {lo} and {hi} layers, "
          f"1 x {args.seq_len} tokens, step {args.steps}, on the CPU with CUDA's dispatch decisions")
    print(f"launches per step (eager): {result['launches_per_step']:,}  = {fixed:,.0f} fixed + {L} x "
          f"{per_layer:,.0f} per layer; Triton launches {result['triton_launches']:,}")
    print("by phase: " + ", ".join(f"{k} {v:,}" for k, v in result["by_phase"].items() if v))
    print("top ops: " + ", ".join(f"{op} {v:,}" for op, v in result["top_ops"]))
    print(f"host syncs per step: {result['syncs_per_step']} ({s_hi.implicit} host reads + {s_hi.explicit} explicit "
          f"at {hi} layers)" + ("" if not s_hi.where else "; e.g. " + "; ".join(s_hi.where[:3])))
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
