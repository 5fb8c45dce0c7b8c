"""`qtrain` command line: parses the arguments and hands them to qtrain.cli.commands."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from qtrain.config.recipe import parse_key
from qtrain.config.shipped import DEFAULT_RECIPE, shipped_recipes
from qtrain.errors import ConfigError, QtrainError


def _command(name: str):
    """The handler of a verb, imported on use: `qtrain --help` stays instant (no torch import)."""
    def run(args) -> int:
        from qtrain.cli import commands
        return getattr(commands, f"cmd_{name}")(args)

    return run


def recipe_flag(key: str) -> Callable[[str], object]:
    """argparse type of a flag that stands for a recipe key: its value is checked as `--set key=value` is."""
    def parse(text: str):
        try:
            return parse_key(key, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError("; ".join(e.problems)) from None

    return parse


def number(kind: type, low: float, *, strict: bool = False) -> Callable[[str], object]:
    """argparse type of a numeric flag with no recipe key: a finite `kind` >= low (> low when strict)."""
    bound = f"{'>' if strict else '>='} {low:g}"
    name = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {name} {bound}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Pretrain LLaMA models on one GPU: int8 weights with "
                                "stochastic rounding, APOLLO optimizers, layer-wise gradient release.")
    # the package's __version__ (qtrain/__init__.py, imported before this module; no edge to the root package)
    p.add_argument("--version", action="version", version=f"qtrain {sys.modules['qtrain'].__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    shipped = ", ".join(sorted(shipped_recipes(), key=_recipe_order))

    def recipe_args(sp):
        sp.add_argument("recipe", nargs="?", default=None,
                        help=f"recipe file or shipped name ({shipped}); default {DEFAULT_RECIPE}")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=50 --set optim.args.rank=4 (repeatable)")

    t = sub.add_parser("train", help="pretrain from a recipe (no recipe: tiny model on the embedded corpus)")
    recipe_args(t)
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc", type=number(int, 1), default=1, metavar="N",
                   help="data parallel on N GPUs of this machine (CPU: N gloo processes): runs torchrun for you")
    t.add_argument("--fsdp", action="store_true",
                   help="with --nproc: shard weights and optimizer states across the processes (FSDP2; "
                        "= --set train.fsdp=true)")
    t.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="machines in the job; run the same command on each, with its --node-rank (torchrun, "
                        "c10d rendezvous at --master)")
    t.add_argument("--node-rank", type=int, default=0, metavar="R",
                   help="this machine's place in the job, 0 .. nnodes-1; node 0 hosts the rendezvous")
    t.add_argument("--master", metavar="ADDR:PORT",
                   help="with --nnodes: node 0's address and a free port, the same on every node")
    t.set_defaults(fn=_command("train"))

    pr = sub.add_parser("prepare", help="tokenize a recipe's corpus into token shards (train does it when missing)")
    recipe_args(pr)
    pr.add_argument("--workers", type=recipe_flag("data.prepare_workers"), metavar="N",
                    help="tokenizing processes (= --set data.prepare_workers=N; 0 = one per core)")
    pr.add_argument("--quiet", action="store_true", help="no progress line")
    pr.set_defaults(fn=_command("prepare"))

    e = sub.add_parser("eval", help="validation loss and perplexity of a run's latest checkpoint")
    e.add_argument("run", help="run directory")
    e.add_argument("--batches", type=recipe_flag("train.eval_batches"), metavar="N",
                   help="evaluation batches (default: the recipe's eval_batches, or its [data] eval_tokens)")
    e.add_argument("--device", choices=["cpu", "cuda"], help="override [train] device")
    e.set_defaults(fn=_command("eval"))

    g = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    g.add_argument("run", help="run directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--tokens", type=number(int, 1), default=64, help="new tokens to sample (default 64)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], help="override [train] device")
    g.set_defaults(fn=_command("generate"))

    x = sub.add_parser("export", help="write a Hugging Face transformers model directory")
    x.add_argument("run", help="run directory")
    x.add_argument("--to", required=True, help="output directory")
    x.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --to directory")
    x.set_defaults(fn=_command("export"))

    pl = sub.add_parser("plot", help="PNG of a run's train/val loss, LR, tokens/s and gradient norm (needs matplotlib)")
    pl.add_argument("run", help="run directory")
    pl.add_argument("--out", help="PNG path (default RUN/metrics.png)")
    pl.set_defaults(fn=_command("plot"))

    s = sub.add_parser("estimate", help="predict peak GPU memory of a recipe before running it")
    recipe_args(s)
    s.add_argument("--gpu-gib", type=number(float, 0, strict=True), metavar="GIB",
                   help="GPU memory to fit into; suggests changes when it does not fit")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--nproc", type=number(int, 1), default=1, metavar="N",
                   help="GPUs of a torchrun job: the per-GPU peak")
    s.add_argument("--fsdp", action="store_true", help="with --nproc: weights and optimizer states sharded (FSDP2)")
    s.set_defaults(fn=_command("estimate"))
    return p


def _recipe_order(name: str) -> tuple:
    """tiny first, then the sizes in order (60m < 1b < 7b), then the rest by name."""
    head = name.split("-")[0]
    scale = {"m": 1e6, "b": 1e9}.get(head[-1:], None)
    if name == DEFAULT_RECIPE:
        return (0, 0, name)
    if scale and head[:-1].isdigit():
        return (1, int(head[:-1]) * scale, name)
    return (2, 0, name)


def _launch_ranks(args, argv: list[str]) -> int:
    """`qtrain train --nproc N`: the recipe's rules for N processes checked here, printed once (each rank would
    print them again), then torchrun starts the ranks (qtrain.cli.torchrun)."""
    from qtrain.cli import commands, torchrun
    from qtrain.config import rules
    from qtrain.core.device import resolve_device

    cfg = commands.train_config(args)
    rules.check_launch(cfg, args.nproc * args.nnodes, resolve_device(cfg.train.device).type)
    return torchrun.launch(args, argv, commands.run_dir(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "estimate" and args.fsdp and args.nproc < 2:
        parser.error("estimate --fsdp shards across processes: give their number with --nproc N (N >= 2)")
    launcher = args.command == "train" and (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ
    try:
        return _launch_ranks(args, argv) if launcher else args.fn(args)
    except QtrainError as e:  # anything else is a bug: its traceback stays
        if isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0":
            return 2  # a rank: every rank finds the same recipe problems, and rank 0 prints them
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
