"""Count the host-device synchronisations a function triggers on CUDA (for the benchmarks).

torch reports implicit syncs (.item(), bool() of a device tensor, ...) as warnings in sync debug mode
"warn"; explicit torch.cuda.synchronize() calls are counted by wrapping it.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def count_syncs(fn: Callable[[], object]) -> str:
    """'<implicit> + <explicit> explicit' for one call of fn (CUDA only)."""
    calls = [0]
    real = torch.cuda.synchronize

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    torch.cuda.synchronize = counting
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize = real
    implicit = sum("synchroniz" in str(w.message) for w in caught)
    return f"{implicit} + {calls[0]} explicit"
