"""`qtrain train --nproc N`: torchrun's launcher, run in this process, with its failure report cut to one line.

torchrun (torch.distributed.run) starts N processes of `python -m qtrain train ...` on this machine. Each
rank prints its own qtrain error (exit 2); when one fails, torchrun stops the others (SIGTERM) and would then
print its own `ChildFailedError` traceback and a table of the failed ranks, the same news again in a harder
form. Launched from here, that exception is caught: the user reads the ranks' errors, then which rank failed
first and, when a checkpoint is there, how to resume.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qtrain.checkpoint.store import checkpoint_dirs


def launch(args, argv: list[str], run_dir: Path) -> int:
    """Run `qtrain <argv less the launch flags>` on args.nproc local processes (of args.nnodes machines); the exit
    code of the first failed rank."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "LOGLEVEL" not in os.environ:  # torchelastic's own log lines (each rank's SIGTERM, the failure table)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    nproc = args.nproc * args.nnodes
    run_args = torchrun.parse_args([*rendezvous_flags(args), f"--nproc_per_node={args.nproc}", "-m", "qtrain",
                                    *without_launch_flags(argv)])
    try:
        torchrun.run(run_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        resume = ""
        found = checkpoint_dirs(run_dir)
        if found:
            resume = (f"; the newest checkpoint ({found[0]}) is complete: fix the cause and relaunch with --resume "
                      f"to continue from it")
        print(f"qtrain train: rank {rank} of {nproc} failed first ({how}), its error is above{resume}",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master")  # torchrun's business, not the ranks'


def rendezvous_flags(args) -> list[str]:
    """One machine (--standalone), or one of args.nnodes machines meeting at args.master (c10d rendezvous, hosted
    by node 0; every node runs the same command with its own --node-rank)."""
    if args.nnodes <= 1:
        return ["--standalone"]
    if not args.master or not args.master.rpartition(":")[2].isdigit():
        raise SystemExit(f"qtrain train: error: --nnodes {args.nnodes} needs --master ADDR:PORT (node 0's "
                         f"address and a free port, the same on every node)")
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"qtrain train: error: --node-rank {args.node_rank} must be in 0 .. {args.nnodes - 1}")
    return [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.master}", "--rdzv-id=qtrain", f"--rdzv-conf=is_host={int(args.node_rank == 0)}"]


def without_launch_flags(argv: list[str]) -> list[str]:
    """The same arguments without the launch flags (--nproc N, --nproc=N, ...): each rank is one process."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            rest.append(a)
    return rest
