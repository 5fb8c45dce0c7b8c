"""Final validation loss and optimizer-state bytes of every matrix method on one recipe, int8 and fp32 weights.

Each (method, mode) run trains the recipe (default: tiny, on the embedded corpus) for the same steps and
batches (TokenSampler with the recipe seed), then evaluates once with qtrain.train.run.evaluate:
  methods   the registry's matrix methods (apollo, apollo_mini, apollo_svd, galore, fira, racs, alice, alice0)
            plus "adamw", the float baseline: qtrain's Adam (optim/adam.py, dataclass defaults) as the method
            of every matrix. Hyperparameters are each dataclass's defaults except rank (--rank, default
            hidden_size / 4) and Alice's leading (--leading, default rank / 4), which must fit the small
            shapes. Matrix LR: the recipe's [optim] lr, except RACS/Alice/Alice-0 at 0.02 as their dataclass
            docstrings give ([004]); --lr METHOD=LR changes one. The float tensors (embedding, norms,
            lm_head) use the recipe's float optimizer at the recipe's float LR for every method, so only the
            matrix method changes.
  modes     int8: the recipe as shipped (int8 weights, SR, layer-wise release);
            fp32: quant.enabled = false (fp32 weights), release as the recipe says.
The loop is qtrain.train.run.fit's step without its logging, checkpoints and intermediate evaluations (none of
which change the trajectory): the LR schedule spans --steps, begin_step, lm_loss, backward, finish_step.
A run whose training loss turns non-finite stops there and is reported as diverged.
State bytes: after training, the sum of dtype.itemsize * numel over every tensor in updater.state of the
matrices ("method state") and, separately, of the float optimizers ("float-optimizer state").
The second table is one 4096 x 11008 weight (LLaMA-7B down_proj): each method's init_state on the meta
device with its dataclass defaults (init_state allocates every persistent tensor up front).

    python tools/compare_optimizers.py --steps 300                        # writes docs/optimizers.md
    python tools/compare_optimizers.py --methods apollo,galore --modes int8 --steps 50 --no-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype, resolve_device
from qtrain.data.dataset import Dataset, prepare_data
from qtrain.model.builder import build_model, enable_activation_checkpointing, is_quantized_projection, llama_config
from qtrain.model.loss import lm_loss
from qtrain.optim.adam import Adam
from qtrain.optim.base import Method
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.optim.registry import MATRIX_METHODS, build_method
from qtrain.train.evaluation import evaluate
from qtrain.train.schedule import lr_at
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release
from qtrain.update.updater import Updater

DOCS = Path(__file__).resolve().parent.parent / "docs" / "optimizers.md"
BASELINE = "adamw"
METHODS = (*MATRIX_METHODS, BASELINE)
LR_FROM_DEFAULTS = {"racs": 0.02, "alice": 0.02, "alice0": 0.02}  # [004] Tables 9 and 11; others: recipe lr
RANKED = ("apollo", "apollo_svd", "galore", "fira", "alice", "alice0")  # apollo_mini keeps its rank 1
MODES = {"int8": ["quant.enabled=true"], "fp32": ["quant.enabled=false"]}
BIG_SHAPE = (4096, 11008)


def method_args(name: str, rank: int, leading: int) -> dict:
    """[optim.args] of one method: dataclass defaults except the rank (and Alice's leading)."""
    args = {"rank": rank} if name in RANKED else {}
    if name in ("alice", "alice0"):
        args["leading"] = leading
    return args


def make_method(name: str, args: dict, weight_decay: float = 0.0, seed: int = 0) -> Method:
    return Adam(weight_decay=weight_decay) if name == BASELINE else build_method(name, args, weight_decay, seed)


def build_adam_updater(model: torch.nn.Module, cfg: TrainConfig) -> Updater:
    """qtrain.train.run.build_updater with Adam (dataclass defaults) as the matrix method: the float baseline.

    Adam is not a registry method, so this repeats build_updater's wiring with that one change.
    """
    o = cfg.optim
    method = make_method(BASELINE, {}, o.weight_decay)
    same = {"same_as_matrices": method, "adam": None}
    floats = float_optimizer_factory(o.float_optimizer, tuple(o.float_betas), o.float_eps)
    bf16_adam = Adam(betas=tuple(o.float_betas), eps=o.float_eps) if o.float_optimizer == "adamw" else None
    return Updater(model, method, floats, lm_head_method=same[o.lm_head_optimizer],
                   embedding_method=same[o.embedding_optimizer], low_precision_adam=bf16_adam, seed=cfg.train.seed,
                   rounding=cfg.quant.rounding, float_grad_clip=o.float_grad_clip, kernels=cfg.quant.kernels)


def projection_shapes(cfg: TrainConfig) -> set[tuple[int, int]]:
    """Shapes of the matrices the method trains, from the Llama built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg.model))
    return {tuple(p.shape) for n, p in model.named_parameters() if is_quantized_projection(n.removesuffix(".weight"))}


def tensor_bytes(state: dict) -> int:
    """Bytes of the tensors in one state dict (ints such as step/uid are not stored tensors)."""
    return sum(v.numel() * v.dtype.itemsize for v in state.values() if isinstance(v, torch.Tensor))


def run_config(base: TrainConfig, name: str, mode: str, steps: int, rank: int, leading: int,
               overrides: list[str], lrs: dict[str, float] | None = None) -> TrainConfig:
    d = base.to_dict()
    d["optim"]["method"] = name
    d["optim"]["args"] = method_args(name, rank, leading)
    d["optim"]["lr"] = (lrs or {}).get(name, LR_FROM_DEFAULTS.get(name, base.optim.lr))
    d["optim"]["float_lr"] = base.optim.float_lr_value  # the float tensors keep the recipe's LR
    d["train"]["steps"] = steps
    return TrainConfig.from_dict(d, MODES[mode] + overrides, source=f"{name}/{mode}")


def train_one(cfg: TrainConfig, data: Dataset, device: torch.device) -> dict:
    """Train one (method, mode) from scratch; returns losses, state bytes and time."""
    t, o = cfg.train, cfg.optim
    dtype = autocast_dtype(cfg.train.dtype, device)
    t0 = time.perf_counter()
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.quant, device, seed=t.seed)
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    updater = build_adam_updater(model, cfg) if o.method == BASELINE else build_updater(model, cfg)
    sampler = data.sampler(t.batch_size, t.seq_len, t.seed)
    if t.release:
        attach_release(updater)
    losses: list[torch.Tensor] = []
    diverged = None
    for k in range(t.steps):
        updater.begin_step(lr_at(k, o.lr, t.steps, o.warmup_frac, o.min_lr_ratio),
                           lr_at(k, o.float_lr_value, t.steps, o.warmup_frac, o.min_lr_ratio))
        step_loss = torch.zeros((), device=device)
        for _ in range(t.grad_accum_steps):
            x, y = sampler.next_batch()
            loss = lm_loss(model, x.to(device), y.to(device), dtype)
            (loss / t.grad_accum_steps).backward()  # release: every tensor is updated in here
            step_loss += loss.detach() / t.grad_accum_steps
        updater.finish_step()
        losses.append(step_loss)
        if (k + 1) % t.log_every == 0 or k + 1 == t.steps:  # one host sync per log_every steps, as fit
            recent = torch.stack(losses[-t.log_every:])
            if not torch.isfinite(recent).all():
                diverged = len(losses) - len(recent) + int((~torch.isfinite(recent)).nonzero()[0]) + 1
                break
    train_losses = torch.stack(losses).tolist()
    tail = train_losses[-max(1, len(train_losses) // 10):]
    val = math.nan if diverged else evaluate(model, data, cfg, device, dtype)

    matrix = set(updater.int8) | {n for n, m in updater.method_floats.items() if m is updater.matrix_method}
    method_state = sum(tensor_bytes(s) for n, s in updater.state.items() if n in matrix)
    float_state = sum(tensor_bytes(s) for n, s in updater.state.items() if n not in matrix)  # bf16 floats' Adam
    float_state += sum(tensor_bytes(s) for opt in updater.float_opts.values() for s in opt.state.values())
    weights = sum(tensor_bytes(dict(layer.named_buffers())) for layer in updater.int8.values())
    weights += sum(p.numel() * p.dtype.itemsize for n, p in updater.floats.items() if n in matrix)
    return {"val": val, "train_tail": sum(tail) / len(tail), "diverged": diverged, "method_state": method_state,
            "float_state": float_state, "weights": weights, "seconds": time.perf_counter() - t0,
            "hyper": dataclasses.asdict(updater.matrix_method)}


def big_weight_rows(methods: list[str]) -> list[str]:
    """Method state of one 4096 x 11008 weight: init_state on meta with dataclass defaults."""
    m, n = BIG_SHAPE
    weight_bf16 = m * n * torch.bfloat16.itemsize
    out = [f"| method | rank | state floats | state MiB | / bf16 weight ({weight_bf16 / 2**20:.0f} MiB) |",
           "|---|---:|---:|---:|---:|"]
    for name in methods:
        method = make_method(name, {})
        method.validate(BIG_SHAPE)
        state = method.init_state(BIG_SHAPE, torch.device("meta"), uid=1)
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        floats = sum(v.numel() for v in tensors)
        nbytes = sum(v.numel() * v.dtype.itemsize for v in tensors)
        rank = getattr(method, "rank", "-")
        out.append(f"| {name} | {rank} | {floats:,} | {nbytes / 2**20:,.2f} | {nbytes / weight_bf16:.4f} |")
    return out


def kib(n: int) -> str:
    return f"{n / 2**10:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny", help="a shipped recipe name or a TOML path")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--modes", default="int8,fp32", help="comma-separated, from int8 (recipe default), fp32")
    p.add_argument("--rank", type=int, default=None, help="rank of the ranked methods (default hidden_size / 4)")
    p.add_argument("--leading", type=int, default=None, help="Alice's leading directions (default rank / 4)")
    p.add_argument("--lr", dest="lrs", action="append", default=[], metavar="METHOD=LR",
                   help="matrix LR of one method, repeatable (default: the recipe's lr; racs/alice/alice0 0.02)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override applied to every run, repeatable (e.g. --set train.batch_size=4); an "
                   "optim.args key reaches every method, so it must be a hyperparameter of each one run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides [train] device")
    p.add_argument("--no-docs", dest="docs", action="store_false", help=f"do not write {DOCS.name}")
    args = p.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    lrs = {k.strip(): float(v) for k, _, v in (item.partition("=") for item in args.lrs)}
    unknown = [m for m in [*methods, *lrs] if m not in METHODS] + [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown method/mode {unknown}; methods: {', '.join(METHODS)}; modes: {', '.join(MODES)}")
    recipe = find_recipe(args.recipe)
    overrides = args.overrides + ([f"train.device={args.device}"] if args.device else [])
    base = TrainConfig.from_toml(recipe)
    steps = args.steps or base.train.steps
    rank = args.rank or base.model.hidden_size // 4
    leading = args.leading if args.leading is not None else rank // 4
    configs = {(n, mode): run_config(base, n, mode, steps, rank, leading, overrides, lrs)
               for n in methods for mode in modes}
    for cfg in configs.values():  # unknown or out-of-range [optim.args] fail here, before any training
        method = make_method(cfg.optim.method, cfg.optim.args)
        for shape in projection_shapes(cfg):
            method.validate(shape)
    first = next(iter(configs.values()))
    device = resolve_device(first.train.device)
    t = first.train
    data = prepare_data(first.data, first.model.vocab_size, t.seq_len)

    mc = first.model
    settings = [
        f"recipe {recipe.name}, overrides: {' '.join(args.overrides) or 'none'}; device {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f" (CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start)")
        + f", torch {torch.__version__}, autocast "
        f"{str(autocast_dtype(first.train.dtype, device)).removeprefix('torch.')}",
        f"model: hidden {mc.hidden_size}, intermediate {mc.intermediate_size}, layers {mc.num_layers}, "
        f"heads {mc.num_heads}, vocab {mc.vocab_size}",
        f"steps {steps}, batch {t.batch_size} x {t.seq_len} ({steps * t.batch_size * t.seq_len:,} tokens), "
        f"grad_accum {t.grad_accum_steps}, seed {t.seed}; LR schedule: warmup {first.optim.warmup_frac}, cosine to "
        f"{first.optim.min_lr_ratio} x lr",
        f"corpus {first.data.corpus!r} ({data.token_path.name}): {len(data.train):,} train tokens, "
        f"{len(data.val):,} val tokens (last {first.data.val_fraction} of the corpus); val loss = mean over "
        f"{t.eval_batches} batches of {t.batch_size} consecutive windows of {t.seq_len} from the val split",
        f"int8 mode: group {first.quant.group_size}, meta {first.quant.meta_dtype}, {first.quant.rounding} rounding; "
        f"release {t.release} in both modes",
        f"float tensors: {first.optim.float_optimizer}, lr {first.optim.float_lr_value}, betas "
        f"{tuple(first.optim.float_betas)}, eps {first.optim.float_eps}, embedding {first.optim.embedding_optimizer}, "
        f"lm_head {first.optim.lm_head_optimizer}",
        f"rank {rank} (ranked methods), Alice leading {leading}; matrix LR: recipe {base.optim.lr}, RACS/Alice/Alice-0 "
        f"0.02" + "".join(f", {k} {v} (--lr)" for k, v in lrs.items()),
    ]
    print("settings:\n  " + "\n  ".join(settings), flush=True)

    results = {}
    hyper = {}
    t_all = time.perf_counter()
    for (name, mode), cfg in configs.items():
        r = train_one(cfg, data, device)
        results[name, mode] = r
        hyper[name] = (cfg.optim.lr, {k: v for k, v in r["hyper"].items() if k not in ("weight_decay",)})
        state = "diverged at step " + str(r["diverged"]) if r["diverged"] else f"val {r['val']:.4f}"
        print(f"{name:<12} {mode:<5} lr {cfg.optim.lr:<5} {state}, train (last 10%) {r['train_tail']:.4f}, "
              f"method state {kib(r['method_state'])} KiB, float-opt state {kib(r['float_state'])} KiB, "
              f"{r['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - t_all

    table = ["| method | mode | matrix lr | final val loss | train loss, last 10% | method state KiB "
             "| float-optimizer state KiB | matrix weights KiB | run s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, mode), r in results.items():
        val = f"diverged (step {r['diverged']})" if r["diverged"] else f"{r['val']:.4f}"
        table.append(f"| {name} | {mode} | {hyper[name][0]} | {val} | {r['train_tail']:.4f} | "
                     f"{kib(r['method_state'])} | {kib(r['float_state'])} | {kib(r['weights'])} | {r['seconds']:.0f} |")
    hyper_lines = [f"- `{name}` (lr {lr}): {', '.join(f'{k}={v}' for k, v in h.items())}"
                   for name, (lr, h) in hyper.items()]
    big = big_weight_rows(methods)
    print()
    print("\n".join(table))
    print()
    print("\n".join(big))
    print(f"total {total:.0f} s for {len(results)} runs")

    if args.docs:
        command = "python tools/compare_optimizers.py " + " ".join(
            ([f"--recipe {args.recipe}"] if args.recipe != "tiny" else [])
            + ([f"--steps {args.steps}"] if args.steps else [])
            + ([f"--methods {args.methods}"] if args.methods != ",".join(METHODS) else [])
            + ([f"--modes {args.modes}"] if args.modes != "int8,fp32" else []) + [f"--lr {x}" for x in args.lrs]
            + [f"--set {o}" for o in args.overrides])
        text = [
            "# Matrix optimizers compared", "",
            f"Generated by `{command.strip()}` ({total / 60:.0f} min for {len(results)} runs).",
            "Every run starts from the same init and sees the same batches; only the matrix method and the weight",
            "storage change. Small-model, short-run numbers: they check that each method trains and what its state",
            "costs, they do not rank the methods at scale. Hyperparameters are untuned dataclass defaults.", "",
            "## Settings", "", "```", *settings, "```", "",
            "Hyperparameters as resolved (dataclass defaults except rank/leading):", "", *hyper_lines, "",
            "## Final validation loss and state", "",
            "Method state: bytes of every tensor in the method's state summed over the matrices; float-optimizer",
            "state: the embedding, norms and lm_head optimizers; matrix weights: int8 codes + per-group scale/offset,",
            "or fp32 weights.", "", *table, "",
            f"## State of one {BIG_SHAPE[0]} x {BIG_SHAPE[1]} weight", "",
            "`init_state` on the meta device with each method's dataclass defaults (its default rank, not the",
            "tiny runs' rank); adamw is qtrain's Adam (two fp32 moments).", "", *big, "",
        ]
        DOCS.write_text("\n".join(text))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
