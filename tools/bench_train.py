"""Tokens/s of qtrain's training step against plain transformers Llama + torch AdamW, same model and batches.

Two rows, one LlamaConfig (qtrain.model.builder.llama_config of the recipe's [model]), the same batches (the
recipe corpus through TokenSampler, drawn and moved to the device before any timing) and the same autocast
dtype (the recipe's [train] dtype as qtrain resolves it):
  qtrain     build_model (int8 projections unless quant.enabled = false) -> build_updater -> attach when
             [train] release = true; a step is begin_step, lm_loss, backward, finish_step, exactly the body
             of qtrain.train.run.fit without its logging, evaluation and checkpoints.
  baseline   transformers.LlamaForCausalLM with fp32 parameters and torch.optim.AdamW over all of them
             (lr = [optim] lr, betas/eps = [optim] float_betas/float_eps, torch's default implementation);
             a step is lm_loss, backward, step, zero_grad(set_to_none=True).
Both use a constant LR (the recipe's peak; the schedule does not change the work of a step) and activation
checkpointing when the recipe enables it. The two paths alternate step by step on the same batch, so load
from other processes hits both rows alike. Time per step: perf_counter around one step, with
torch.cuda.synchronize() before and after on CUDA; tokens/s = batch_size * seq_len / median step time.

    python tools/bench_train.py                      # tiny recipe, auto device
    python tools/bench_train.py --recipe 60m --set train.batch_size=4 --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype, resolve_device
from qtrain.data.dataset import prepare_data
from qtrain.model.builder import build_model, enable_activation_checkpointing, llama_config
from qtrain.model.loss import lm_loss
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> tuple[float, torch.Tensor]:
    """(seconds, loss) of one call of step(); the device is idle at both ends of the window."""
    sync(device)
    t0 = time.perf_counter()
    loss = step()
    sync(device)
    return time.perf_counter() - t0, loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny", help="a shipped recipe name (tiny, 60m, ...) or a TOML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override, repeatable (e.g. --set train.batch_size=4)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per path first (state allocation, caches)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="overrides [train] device (default: the recipe's)")
    args = p.parse_args()

    recipe = find_recipe(args.recipe)
    overrides = args.overrides + ([f"train.device={args.device}"] if args.device else [])
    cfg = TrainConfig.from_toml(recipe, overrides)
    t, o = cfg.train, cfg.optim
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.dtype, device)
    total = args.warmup + args.steps

    # Data prep outside the timed region: every batch is drawn and on the device before step 1.
    data = prepare_data(cfg.data, cfg.model.vocab_size, t.seq_len)
    sampler = data.sampler(t.batch_size, t.seq_len, t.seed)
    batches = [tuple(b.to(device) for b in sampler.next_batch()) for _ in range(total)]  # (B, T) int64 each

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.quant, device, seed=t.seed)
    updater = build_updater(model, cfg)
    if t.release:
        attach_release(updater)

    torch.manual_seed(t.seed)
    with torch.device(device):
        plain = LlamaForCausalLM(llama_config(cfg.model))  # fp32 parameters, transformers' own init
    adamw = torch.optim.AdamW(plain.parameters(), lr=o.lr, betas=tuple(o.float_betas), eps=o.float_eps,
                              weight_decay=o.weight_decay)
    for m in (model, plain):
        if t.activation_checkpointing:
            enable_activation_checkpointing(m)
        m.train()

    def qtrain_step(x, y):
        updater.begin_step(o.lr, o.float_lr_value)
        loss = lm_loss(model, x, y, dtype)
        loss.backward()  # release: every tensor is updated and its gradient freed in here
        updater.finish_step()  # non-release: all updates happen here
        return loss.detach()

    def baseline_step(x, y):
        loss = lm_loss(plain, x, y, dtype)
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return loss.detach()

    times: dict[str, list[float]] = {"qtrain": [], "baseline": []}
    losses: dict[str, list[torch.Tensor]] = {"qtrain": [], "baseline": []}
    for k, (x, y) in enumerate(batches):
        for name, step in (("qtrain", qtrain_step), ("baseline", baseline_step)):
            dt, loss = timed(lambda: step(x, y), device)
            losses[name].append(loss)
            if k >= args.warmup:
                times[name].append(dt)

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end"
    n_params = sum(p.numel() for p in plain.parameters())
    tokens = t.batch_size * t.seq_len
    m = cfg.model
    print(f"settings: device={device.type} ({dev_name}), torch {torch.__version__}, "
          f"autocast dtype {str(dtype).removeprefix('torch.')}")
    print(f"  recipe {recipe.name} {' '.join(args.overrides)}".rstrip())
    print(f"  model: hidden {m.hidden_size}, intermediate {m.intermediate_size}, layers {m.num_layers}, "
          f"heads {m.num_heads}, vocab {m.vocab_size}, attn {m.attn_implementation}: {n_params / 1e6:.2f}M params")
    print(f"  batch {t.batch_size} x {t.seq_len} = {tokens} tokens/step, activation checkpointing "
          f"{t.activation_checkpointing}; data: {data.token_path.name}, sampler seed {t.seed}")
    print(f"  warmup {args.warmup}, timed {args.steps} steps per path, alternating; median step time")
    quant = (f"int8 group {cfg.quant.group_size}, {cfg.quant.rounding} rounding, kernels {cfg.quant.kernels}"
             if cfg.quant.enabled else "float projections")
    print(f"  qtrain: {o.method} {dict(o.args)}, lr {o.lr} (constant), {quant}, release {t.release}; "
          f"float tensors ({m.float_dtype}): {o.float_optimizer}, lr {o.float_lr_value}")
    print(f"  baseline: fp32 params, torch.optim.AdamW lr {o.lr} (constant), betas {tuple(o.float_betas)}, "
          f"eps {o.float_eps}, weight_decay {o.weight_decay}")
    print(f"{'path':<10} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'tokens/s':>10}  loss first -> last")
    rate = {}
    for name in ("qtrain", "baseline"):
        med = statistics.median(times[name])
        rate[name] = tokens / med
        first, last = losses[name][0].item(), losses[name][-1].item()
        print(f"{name:<10} {med * 1e3:>10.2f} {min(times[name]) * 1e3:>9.2f} {max(times[name]) * 1e3:>9.2f} "
              f"{rate[name]:>10,.0f}  {first:.3f} -> {last:.3f}")
    print(f"qtrain / baseline: tokens/s {rate['qtrain'] / rate['baseline']:.2f}x")


if __name__ == "__main__":
    main()
