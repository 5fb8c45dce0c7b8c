"""Data-parallel scaling of qtrain: tokens/s, per-rank peak memory and communication time, 1 vs 2 ranks.

    python tools/bench_dp.py [--recipe tiny] [--steps 20] [--warmup 3] [--ranks 1,2] [--set KEY=VALUE ...]

Each configuration runs in fresh processes (torch.multiprocessing, gloo on CPU; NCCL when every rank has a
GPU): the recipe's model and updater from qtrain.train.build, layer-wise release as the recipe says, the same
gradient reduction qtrain.train.run installs (OverlappedReducer with [train] dp_overlap, or the synchronous
hook), and steps of the training loop's shape (batch_at, lm_loss / W, backward, finish_step). One thread per
rank on CPU, so 2 ranks on 2 cores can ideally reach 2x. Printed: tokens/s (global), ms per step, host time
per step spent waiting for all-reduces (what was not hidden behind backward), peak RSS (CPU) or peak CUDA
memory per rank, the persistent bytes per rank (weights + optimizer states), and the 2-rank / 1-rank ratio
measured in the same run. `--set train.fsdp=true` shards with FSDP2 instead (qtrain.parallel.fsdp); its collectives
run inside FSDP2, so no wait time is printed for it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, init: str, recipe: str, overrides: list[str], steps: int, warmup: int, out):
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    from qtrain.config.recipe import TrainConfig
    from qtrain.config.shipped import find_recipe
    from qtrain.core.device import autocast_dtype
    from qtrain.data.dataset import prepare_data
    from qtrain.model.loss import lm_loss
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World
    from qtrain.parallel.fsdp import ShardedTraining, persistent_bytes
    from qtrain.train.build import build
    from qtrain.update.release import attach_release

    cfg = TrainConfig.from_toml(find_recipe(recipe), overrides)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dtype = autocast_dtype(cfg.train.dtype, device)
    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, None)
    sharded = cfg.train.fsdp and world > 1
    built = build(cfg, torch.device("cpu") if sharded else device)  # FSDP2 moves each shard to the device
    model, updater = built.model, built.updater
    sampler = data.sampler(cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    comm = {"s": 0.0}
    reducer = None
    if sharded:  # FSDP2: its hooks update every shard inside backward; its collectives are not timed apart
        training = ShardedTraining(model, cfg, World(rank, world, rank, sharded=True), device)
        model, updater = training.model, training.updater
        comm["s"] = float("nan")
    elif world > 1 and cfg.train.release and cfg.train.dp_overlap > 0:
        reducer = distributed.OverlappedReducer(cfg.train.dp_overlap)
    elif world > 1:
        def timed_reduce(name, grad):
            t0 = time.perf_counter()
            distributed.reduce_grad_(name, grad)
            comm["s"] += time.perf_counter() - t0
        updater.add_grad_hook(timed_reduce)
    if cfg.train.release and not sharded:
        attach_release(updater, reducer)
    A = cfg.train.grad_accum_steps

    def step(k: int) -> None:
        updater.begin_step(1e-3, 1e-3)
        for a in range(A):
            x, y = (t.to(device) for t in sampler.batch_at(k * world * A + rank * A + a))
            (lm_loss(model, x, y, dtype) / (A * world)).backward()
        updater.finish_step()

    for k in range(warmup):
        step(k)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    comm["s"] = float("nan") if sharded else 0.0
    if reducer is not None:
        reducer.wait_s = 0.0
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    waited = reducer.wait_s if reducer is not None else comm["s"]
    out[rank] = (elapsed, waited, peak, backend, persistent_bytes(model, updater))
    if not sharded:
        distributed.check_replicas(model, World(rank, world, rank), steps)
    dist.destroy_process_group()


def measure(world: int, args) -> dict:
    out = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, f"file://{Path(tmp) / 'rdzv'}", args.recipe, args.set, args.steps,
                               args.warmup, out), nprocs=world, join=True)
    from qtrain.config.recipe import TrainConfig
    from qtrain.config.shipped import find_recipe

    cfg = TrainConfig.from_toml(find_recipe(args.recipe), args.set)
    tokens = world * cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum_steps * args.steps
    elapsed = max(v[0] for v in out.values())
    return {"world": world, "tok_s": tokens / elapsed, "step_ms": 1000 * elapsed / args.steps,
            "comm_ms": 1000 * max(v[1] for v in out.values()) / args.steps,
            "peak": max(v[2] for v in out.values()), "backend": out[0][3], "release": cfg.train.release,
            "overlap": "fsdp" if cfg.train.fsdp and world > 1 else cfg.train.dp_overlap,
            "persistent": max(v[4] for v in out.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [measure(int(w), args) for w in args.ranks.split(",")]
    print(f"recipe {args.recipe} {' '.join('--set ' + s for s in args.set)}; {args.steps} timed steps after "
          f"{args.warmup} warmup; one thread per rank; {os.cpu_count()} CPUs")
    print("| ranks | backend | release | dp_overlap / fsdp | tokens/s | ms/step | comm wait ms/step | peak per rank | "
          "persistent per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['backend']} | {r['release']} | {r['overlap']} | {r['tok_s']:,.0f} | "
              f"{r['step_ms']:.1f} | {r['comm_ms']:.1f} | {r['peak'] / 2**20:,.0f} MiB | "
              f"{r['persistent'] / 2**20:,.2f} MiB |")
    if len(rows) > 1:
        print(f"scaling: {rows[-1]['world']} ranks / 1 rank tokens/s = {rows[-1]['tok_s'] / rows[0]['tok_s']:.2f}x "
              f"(ideal {rows[-1]['world']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
