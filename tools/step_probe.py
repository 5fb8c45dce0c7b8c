"""One training-step variant on one device: tokens/s, step time, peak allocated memory and the estimator's
prediction, as one JSON line (tools/gpu_check.sh runs one process per variant and collects the lines).

    python tools/step_probe.py qtrain 7b                          # the recipe as shipped (7b: captured step)
    python tools/step_probe.py qtrain 7b --set train.cuda_graph=false               # the eager step
    python tools/step_probe.py qtrain 7b-8gb --set train.activation_checkpointing=false
    python tools/step_probe.py floor 7b        # bf16 transformers Llama, no optimizer (grads freed in hooks)
    python tools/step_probe.py official 7b     # apollo-torch's APOLLO-Mini, layer-wise, bf16 weights
    python tools/step_probe.py qtrain tiny --device cpu --steps 2  # a dry run of the same code on the CPU

qtrain: the step as `qtrain.train.loop.fit` runs it (begin_step, qtrain.update.step.train_step or the
CapturedStep of [train] cuda_graph, the gradient-norm meter and its take()), batch x seq_len of the recipe, uniform
random tokens. Timing: after the warm-up (3 steps, or warm-up + capture with cuda_graph), --steps steps queued
back to back between two device syncs: tokens/s = steps x tokens / seconds. Peak: torch.cuda.max_memory_allocated
over the whole process (weights, states, the graph pool, warm-up), beside `qtrain estimate`'s peak allocated.
floor / official: tools/bench_step.py's bf16 baselines at the recipe's LlamaConfig, same batch, no checkpointing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype
from qtrain.model.loss import lm_loss


def qtrain_step(cfg: TrainConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    """(step function, warm-up steps) of fit's step for cfg."""
    from qtrain.train.build import build
    from qtrain.update.release import attach_release
    from qtrain.update.step import train_step
    from qtrain.update.step_graph import CapturedStep

    built = build(cfg, device)
    model, updater = built.model, built.updater
    grad_norm = updater.measure_grad_norm()  # as fit: its launches are part of the step
    attach_release(updater)
    dtype = autocast_dtype(cfg.train.dtype, device)
    captured = CapturedStep(model, updater, device, dtype) if cfg.train.cuda_graph else None
    o = cfg.optim

    def step() -> None:
        updater.begin_step(o.lr, o.float_lr_value)
        if captured is not None:
            captured(x, y)
        else:
            train_step(model, updater, [(x, y)], dtype)
        grad_norm.take()

    return step, (captured.steps_to_capture if captured is not None and captured.capturing else 3)


def baseline_step(kind: str, cfg: TrainConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    from bench_step import apollo_torch_hooks, float_llama

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = float_llama(cfg.model, device, dtype, cfg.train.seed)
    model.train()
    if kind == "floor":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))  # no optimizer
    else:
        apollo_torch_hooks(model, cfg.optim.lr, cfg.optim.float_lr_value)

    def step() -> None:
        lm_loss(model, x, y, dtype).backward()  # every parameter is stepped (or freed) in its hook

    return step, 3


def probe(kind: str, recipe: str, overrides: list[str], device: torch.device, steps: int) -> dict:
    cfg = TrainConfig.from_toml(find_recipe(recipe), overrides + [f"train.device={device.type}"])
    t = cfg.train
    result = {"kind": kind, "recipe": recipe, "overrides": overrides, "device": device.type,
              "batch": t.batch_size, "seq_len": t.seq_len, "cuda_graph": t.cuda_graph and kind == "qtrain",
              "checkpointing": t.activation_checkpointing and kind == "qtrain"}
    if kind == "qtrain" and device.type == "cuda":
        from qtrain.estimate.memory import estimate

        result["estimate_peak_allocated_gib"] = round(estimate(cfg, "cuda").peak_allocated / 2**30, 3)
    gen = torch.Generator().manual_seed(t.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)  # (B, T) each
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    t0 = time.perf_counter()
    step, warmup = qtrain_step(cfg, device, x, y) if kind == "qtrain" else baseline_step(kind, cfg, device, x, y)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    result["warmup_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - t0  # the host has queued every step here
    sync()
    seconds = time.perf_counter() - t0
    result.update(steps=steps, step_ms=round(1e3 * seconds / steps, 2), host_ms=round(1e3 * host / steps, 2),
                  tok_s=round(steps * t.batch_size * t.seq_len / seconds))
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("qtrain", "floor", "official"))
    p.add_argument("recipe", help="a shipped recipe name or a recipe file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    p.add_argument("--name", default="", help="the row's name in the summary")
    p.add_argument("--out", default="", help="append the JSON line to this file too")
    args = p.parse_args()
    try:
        row = probe(args.kind, args.recipe, args.overrides, torch.device(args.device), args.steps)
    except Exception as e:  # one line whatever happens: the summary shows the error beside the other rows
        row = {"kind": args.kind, "recipe": args.recipe, "overrides": args.overrides,
               "error": f"{type(e).__name__}: {str(e)[:300]}", "trace": traceback.format_exc()[-1200:]}
    row["name"] = args.name or f"{args.kind} {args.recipe}"
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    if "error" in row:
        sys.exit(1)


if __name__ == "__main__":
    main()
