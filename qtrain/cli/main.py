"""`qtrain` command line: parses the arguments and hands them to qtrain.cli.commands."""

from __future__ import annotations

import argparse
import os
import sys

from qtrain.config.shipped import DEFAULT_RECIPE


def _command(name: str):
    """The handler of a verb, imported on use: `qtrain --help` stays instant (no torch import)."""
    def run(args) -> int:
        from qtrain.cli import commands
        return getattr(commands, f"cmd_{name}")(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Pretrain LLaMA models on one GPU: int8 weights with "
                                "stochastic rounding, APOLLO optimizers, layer-wise gradient release.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp):
        sp.add_argument("recipe", nargs="?", default=None,
                        help=f"recipe file or shipped name (tiny, 60m, 130m, 350m, 1b, 7b, 7b-8gb); default {DEFAULT_RECIPE}")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=50 --set optim.args.rank=4 (repeatable)")

    t = sub.add_parser("train", help="pretrain from a recipe (no recipe: tiny model on the embedded corpus)")
    recipe_args(t)
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
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
    pr.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: [data] prepare_workers, "
                    "0 = one per core)")
    pr.add_argument("--quiet", action="store_true", help="no progress line")
    pr.set_defaults(fn=_command("prepare"))

    e = sub.add_parser("eval", help="validation loss and perplexity of a run's latest checkpoint")
    e.add_argument("run", help="run directory")
    e.add_argument("--batches", type=int, default=0, help="evaluation batches (default: the recipe's)")
    e.add_argument("--device", choices=["cpu", "cuda"], help="override [train] device")
    e.set_defaults(fn=_command("eval"))

    g = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    g.add_argument("run", help="run directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--tokens", type=int, default=64, help="new tokens to sample (default 64)")
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
    s.add_argument("--gpu-gib", type=float, help="GPU memory to fit into; suggests changes when it does not fit")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--nproc", type=int, default=1, help="GPUs of a torchrun job: the per-GPU peak")
    s.add_argument("--fsdp", action="store_true", help="with --nproc: weights and optimizer states sharded (FSDP2)")
    s.set_defaults(fn=_command("estimate"))
    return p


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master")  # torchrun's business, not the ranks'


def torchrun_command(args, argv: list[str]) -> list[str]:
    """The torchrun command that runs `qtrain` with argv (less the launch flags) on args.nproc local processes:
    one machine (--standalone), or one of args.nnodes machines meeting at args.master (c10d rendezvous, hosted
    by node 0; every node runs the same command with its own --node-rank)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            rest.append(a)
    launch = ["--standalone"]
    if args.nnodes > 1:
        if not args.master or not args.master.rpartition(":")[2].isdigit():
            raise SystemExit(f"qtrain train: error: --nnodes {args.nnodes} needs --master ADDR:PORT (node 0's "
                             f"address and a free port, the same on every node)")
        if not 0 <= args.node_rank < args.nnodes:
            raise SystemExit(f"qtrain train: error: --node-rank {args.node_rank} must be in 0 .. {args.nnodes - 1}")
        launch = [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={args.master}", "--rdzv-id=qtrain",
                  f"--rdzv-conf=is_host={int(args.node_rank == 0)}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={args.nproc}",
            "-m", "qtrain", *rest]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "train" and (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        cmd = torchrun_command(args, argv)
        os.execv(sys.executable, cmd)  # this process becomes torchrun, which starts the ranks
    from qtrain.config.recipe import ConfigError
    from qtrain.errors import QtrainError

    try:
        return args.fn(args)
    except (ConfigError, QtrainError, ValueError) as e:
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
