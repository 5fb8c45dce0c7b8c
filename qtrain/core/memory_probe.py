"""Peak bytes allocated by a function on CPU, from the profiler's allocation events.

CPU has no allocator statistics like torch.cuda.max_memory_allocated; the profiler records every
allocation and free ("[memory]" events with signed byte counts), and their running sum is the live
set. Used by the tests and the estimator's CPU validation.
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, net): the highest live total of bytes allocated during fn() above the level at entry,
    and the bytes still held at exit (net > 0: fn kept them; net < 0: fn freed older tensors)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live
