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


def launch(nproc: int, argv: list[str], run_dir: Path) -> int:
    """Run `qtrain <argv without --nproc>` on nproc local processes; the exit code of the first failed rank."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "LOGLEVEL" not in os.environ:  # torchelastic's own log lines (each rank's SIGTERM, the failure table)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "qtrain", *without_nproc(argv)])
    try:
        torchrun.run(args)
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


def without_nproc(argv: list[str]) -> list[str]:
    """The same arguments without --nproc N / --nproc=N (each rank is one process)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return rest
