"""Ctrl-C or SIGTERM during training: the first finishes the current step and saves, a second stops at once.

SIGTERM is what schedulers (Slurm, Kubernetes, systemd) send before they kill a job, so it is handled like
Ctrl-C. Under torchrun SIGTERM already has a handler (qtrain.parallel.distributed.sigterm_as_error: torchrun
sends it to every rank when one fails, and then it must be an error); StopRequest takes SIGTERM only while
it still has Python's default handling, so that handler is kept.
"""

from __future__ import annotations

import signal
import threading

from tqdm import tqdm

WHAT = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequest:
    """Context manager; `requested` turns true at the first SIGINT (or SIGTERM), `signal_name` says which.

    Outside the main thread it does nothing (Python delivers signals to the main thread only).
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, object] = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            self.signal_name = WHAT[signum]
            tqdm.write(f"{self.signal_name}: finishing this step and saving a checkpoint "
                       f"(send it again to stop at once without saving)")

        if threading.current_thread() is threading.main_thread():
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not under torchrun's sigterm_as_error
                self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old.clear()
