"""Ctrl-C during training: the first finishes the current step and saves, the second stops at once."""

from __future__ import annotations

import signal
import threading

from tqdm import tqdm


class StopRequest:
    """Context manager; `requested` turns true at the first SIGINT. Outside the main thread it does nothing."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write("Ctrl-C: finishing this step and saving a checkpoint (press again to abort without saving)")

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
