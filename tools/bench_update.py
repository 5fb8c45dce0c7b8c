"""Time and peak transient memory of ONE APOLLO-Mini update of an int8 weight with stochastic rounding.

Two rows, same weight shape, gradient and hyperparameters:
  qtrain       Apollo.direction (APOLLO-Mini, P regenerated from a seed) -> dispatch.int8_scaled_update_
               (fp32 dequantize/update/SR; the fused Triton kernel on CUDA, the chunked torch reference on CPU).
  official     a re-creation of the official q_apollo step for one int8 weight (docs/algorithms.md §12, §17), written for
               this benchmark: dequantize to the gradient dtype with the integer zero point, stored projection,
               the step in bf16 on full-size clones (the official code holds about six), SR in bf16 with the
               global RNG, Python max and NaN asserts on device scalars, torch.cuda.synchronize() per weight.

Memory: on CUDA, torch.cuda.max_memory_allocated() during the update minus the allocation before it.
On CPU, the peak of the running sum of the CPU allocator's alloc/free records that
torch.profiler.profile(profile_memory=True) captures during the update, relative to its start.
Both count transients only: the stored codes, scales and optimizer state exist before the update.

    python tools/bench_update.py --device cpu --shape 4096 11008 --reps 3
    python tools/bench_update.py --device cuda --reps 50
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from qtrain.core.seeding import update_seed
from qtrain.core.sync_probe import count_syncs
from qtrain.optim.apollo import apollo_mini
from qtrain.quant import dispatch, triton_kernels
from qtrain.quant.groupwise import CODE_MAX, quantize_groupwise

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------
# the official path, re-created (§12 formulas, §17 bugs kept on purpose: they are what we measure)


def official_quantize_nearest(w: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """§12 integer zero point: Δ = max(range, 1e-5)/255, z = clamp(-round(min/Δ)), C = clamp(round(w/Δ) + z)."""
    groups = w.reshape(-1, g)  # (G, g) in w's dtype
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)  # (G, 1)
    delta = (hi - lo).clamp(min=1e-5) / CODE_MAX
    zero = (-torch.round(lo / delta)).clamp_(0, CODE_MAX)
    codes = torch.clamp(torch.round(groups / delta) + zero, 0, CODE_MAX).to(torch.uint8).reshape(w.shape)
    return codes, delta, zero


@dataclass
class OfficialState:
    proj: Tensor  # stored P: (a, 1) if m < n else (1, a), in the gradient dtype
    exp_avg: Tensor  # (1, b) or (b, 1) fp32, as bitsandbytes' 32-bit Adam keeps them
    exp_avg_sq: Tensor
    step: int = 0
    prev_norm: Tensor | None = None


def official_init(shape: tuple[int, int], grad: Tensor, seed: int) -> OfficialState:
    m, n = shape
    gen = torch.Generator(grad.device).manual_seed(seed)
    side = (m, 1) if m < n else (1, n)  # projects the short side a = min(m, n)
    proj = torch.randn(side, generator=gen, device=grad.device).to(grad.dtype)
    low_rank = (1, n) if m < n else (m, 1)
    zeros = torch.zeros(low_rank, device=grad.device)
    return OfficialState(proj=proj, exp_avg=zeros, exp_avg_sq=zeros.clone())


@torch.no_grad()
def official_update(codes, delta, zero, g, grad, st: OfficialState, lr, wd, scale, betas, eps):
    """One q_apollo-style update; returns the new (codes, delta, zero). Full-size tensors are marked #k."""
    m, n = codes.shape
    # 1. dequantize into the gradient dtype: Ŵ = (C - z)·Δ
    float_weight = codes.to(grad.dtype).reshape(-1, g)  # #1, alive for the whole step (a loop local upstream)
    float_weight.sub_(zero).mul_(delta)
    float_weight = float_weight.reshape(m, n)
    weight = codes.to(grad.dtype)  # #2: the int8 storage cast to the float dtype ...
    weight = float_weight.clone()  # ... then replaced by a copy of the dequantized weight (#3)
    # 2. project with the stored P: R = PᵀG (1, n) if m < n, else G Pᵀ (m, 1)
    r = st.proj.t() @ grad if m < n else grad @ st.proj.t()
    saved_weight = weight.clone()  # #4
    saved_grad = grad.clone()  # #5
    # 3. Adam on R (fp32 moments, bias correction inside, lr 1 on a zeroed tensor -> N = -Adam(R))
    st.step += 1
    b1, b2 = betas
    st.exp_avg.mul_(b1).add_(r.float(), alpha=1 - b1)
    st.exp_avg_sq.mul_(b2).addcmul_(r.float(), r.float(), value=1 - b2)
    c1, c2 = 1 - b1**st.step, 1 - b2**st.step
    norm_dir = (-(st.exp_avg / c1) / ((st.exp_avg_sq / c2).sqrt() + eps)).to(grad.dtype)
    if grad.is_cuda:
        torch.cuda.synchronize()  # §17.3: explicit sync after every weight's optimizer kernel
    # 4. APOLLO-Mini: one factor for the tensor, applied to a copy of the raw gradient
    s = norm_dir.norm() / (r.norm() + 1e-8)
    scaled = saved_grad.clone() * s  # #6 (clone, freed) and #7 (product)
    # 5. norm-growth limiter with Python max() on a device scalar (a host sync on CUDA)
    grad_norm = torch.norm(scaled)
    if st.prev_norm is None:
        st.prev_norm = grad_norm
    else:
        limiter = max(grad_norm / (st.prev_norm + 1e-8), 1.01) / 1.01
        scaled = scaled / limiter  # #8
        st.prev_norm = grad_norm / limiter
    scaled *= math.sqrt(scale)
    saved_weight.add_(scaled, alpha=-lr)  # bf16: updates below half an ulp are lost here (§12)
    if wd > 0:
        saved_weight.add_(saved_weight, alpha=-lr * wd)
    weight = saved_weight
    del saved_grad, scaled
    # 6. SR requantization in the weight dtype with fresh ranges and the global RNG (§12, §17.4)
    w = weight.clone().reshape(-1, g)  # #9
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    new_delta = (hi - lo).clamp(min=1e-5) / CODE_MAX
    new_zero = (-torch.round(lo / new_delta)).clamp_(0, CODE_MAX)
    assert torch.isnan(new_delta).sum() == 0 and torch.isnan(w).sum() == 0  # two more host syncs
    v = w / new_delta  # full
    up, down = torch.ceil(v), torch.floor(v)  # 2 full
    frac = v - down  # full
    u = torch.rand_like(frac)  # full, global generator
    q = torch.where(u < frac, up, down)  # full (+ a full bool)
    new_codes = torch.clamp(q + new_zero, 0, CODE_MAX).reshape(m, n).to(torch.uint8)
    return new_codes, new_delta, new_zero


# ---------------------------------------------------------------------------------------------------
# measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, reps: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_transient_bytes(step, device: torch.device) -> int:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # raw allocator records (alloc > 0, free < 0) in time order; FunctionEvent.cpu_memory_usage would
    # attribute them to ops and lose the ordering
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def implicit_syncs(step, device: torch.device) -> str:
    """Host syncs in one step (CUDA only): see qtrain.core.sync_probe."""
    return count_syncs(step) if device.type == "cuda" else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 11008), metavar=("M", "N"))
    p.add_argument("--reps", type=int, default=None, help="timed updates per path (default 3 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed updates first (step 1 has no limiter state)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--grad-dtype", choices=tuple(DTYPES), default="bf16", help="gradient (and official weight) dtype")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device(args.device)
    reps = args.reps or (3 if device.type == "cpu" else 50)
    m, n = args.shape
    g, lr, wd = args.group_size, args.lr, args.weight_decay
    gdtype = DTYPES[args.grad_dtype]

    gen = torch.Generator(device).manual_seed(args.seed)
    w0 = torch.randn(m, n, generator=gen, device=device) * 0.02  # (m, n) fp32, LLaMA-like init scale
    grad = (torch.randn(m, n, generator=gen, device=device) * 1e-3).to(gdtype)  # one gradient, reused

    # qtrain: fp32 scale/offset, seeded P, fp32 update + SR
    method = apollo_mini(bias_correction="inside", eps=1e-8)
    state = method.init_state((m, n), device, uid=1)
    codes, scale, offset = quantize_groupwise(w0, g)
    backend = "triton" if device.type == "cuda" and triton_kernels.HAVE_TRITON else "torch"  # dispatch's "auto"

    def qtrain_step():
        update = method.direction(grad, state)  # Update(grad_scale=0-dim fp32), APOLLO-Mini §5
        seed = update_seed(args.seed, state["uid"], state["step"])
        dispatch.int8_scaled_update_(codes, scale, offset, g, grad, update.grad_scale, lr, wd, generator_seed=seed)

    # official: bf16 (gradient dtype) Δ and integer zero point, stored P, fp32 Adam moments on R
    official = list(official_quantize_nearest(w0.to(gdtype), g))
    ostate = official_init((m, n), grad, args.seed)

    def official_step():
        official[:] = official_update(*official, g, grad, ostate, lr, wd, method.scale, method.betas, method.eps)

    rows = []
    for name, step in (("qtrain", qtrain_step), ("official", official_step)):
        for _ in range(args.warmup):
            step()
        times = time_ms(step, reps, device)
        rows.append((name, statistics.median(times), min(times), max(times),
                     peak_transient_bytes(step, device), implicit_syncs(step, device)))

    if device.type == "cuda":
        dev_name, memory_rule = torch.cuda.get_device_name(device), "cuda max_memory_allocated - allocated before"
    else:
        dev_name = f"CPU, {torch.get_num_threads()} threads"
        memory_rule = "peak of torch.profiler CPU alloc/free records"
    triton_version = triton_kernels.triton.__version__ if triton_kernels.HAVE_TRITON else "not installed"
    grad_mib = m * n * gdtype.itemsize / 2**20
    print(f"settings: device={device.type} ({dev_name}), torch {torch.__version__}, triton {triton_version}")
    print(f"  weight {m}x{n} int8 codes, group {g}; gradient {args.grad_dtype} ({grad_mib:.1f} MiB); "
          f"lr {lr}, weight_decay {wd}; warmup {args.warmup}, reps {reps}")
    print(f"  APOLLO-Mini: rank {method.rank}, scale {method.scale}, scale_type {method.scale_type}, "
          f"betas {method.betas}, eps {method.eps}, bias_correction {method.bias_correction}")
    print(f"  qtrain: seeded P, fp32 scale/offset, fp32 update + SR, backend {backend}")
    print(f"  official: stored P ({args.grad_dtype}), {args.grad_dtype} Δ + integer zero point, "
          f"{args.grad_dtype} update and SR, global RNG")
    print(f"  memory: {memory_rule}")
    print(f"{'path':<10} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'peak transient MiB':>19} "
          f"{'/ grad size':>12}  host syncs")
    for name, med, lo, hi, peak, syncs in rows:
        print(f"{name:<10} {med:>10.2f} {lo:>9.2f} {hi:>9.2f} {peak / 2**20:>19.1f} "
              f"{peak / 2**20 / grad_mib:>12.2f}  {syncs}")
    qtrain_row, official_row = rows
    print(f"official / qtrain: time {official_row[1] / qtrain_row[1]:.2f}x, "
          f"peak transient memory {official_row[4] / max(qtrain_row[4], 1):.2f}x")

if __name__ == "__main__":
    main()
