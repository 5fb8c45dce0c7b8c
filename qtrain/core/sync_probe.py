"""Count the host-device synchronisations of one call: on CUDA for the benchmarks, and on the CPU as a stand-in.

Two kinds:
  implicit  a tensor value read on the host (.item(), float(t), bool(t), .tolist(), a device -> host copy).
            On CUDA torch reports them as warnings in sync debug mode "warn" (`count_syncs`). On the CPU no
            such read blocks, so `cpu_host_reads` counts the reads themselves: every one of them would wait for
            the GPU on a CUDA run. Reads of a CPU-resident scalar that stays on the CPU on CUDA too (torch's
            non-capturable Adam `step` counter, read by torch.optim's `_get_value`) are not syncs and are skipped.
  explicit  a call of torch.cuda.synchronize, torch.cuda.Stream.synchronize (current_stream().synchronize()),
            torch.cuda.Event.synchronize, or of a library helper that calls one (bitsandbytes' `sync_gpu`).
            torch's sync debug mode does NOT report these (c10's device_synchronize never calls
            warn_or_error_on_sync), so they are counted by wrapping them (`explicit_syncs`). On the CPU the
            wrappers do nothing but count, and a profile hook on the calling thread also counts calls of any
            Python function named `synchronize` or `sync_gpu` (bitsandbytes' helper only calls
            torch.cuda.synchronize for CUDA tensors, so on the CPU its call is what would have synced).
            Nested calls (sync_gpu -> torch.cuda.synchronize) count once.

`count_syncs` (CUDA) and `cpu_syncs` (CPU) both return a SyncCount; a step is sync-free iff `count.total == 0`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

SYNC_FUNCTION_NAMES = frozenset({"synchronize", "sync_gpu"})
HOST_READ_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclass
class SyncCount:
    implicit: int = 0
    explicit: int = 0
    where: list[str] = field(default_factory=list)  # "kind: function (file:line)" of the first few

    @property
    def total(self) -> int:
        return self.implicit + self.explicit

    def __str__(self) -> str:
        return f"{self.implicit} + {self.explicit} explicit"


_depth = threading.local()  # nesting of sync calls on this thread: only the outermost counts


def _site(frame) -> str:
    """The first caller outside this module and torch.cuda: where the sync was asked for."""
    while frame is not None and (frame.f_code.co_filename == __file__ or "/torch/cuda/" in frame.f_code.co_filename):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"


@contextlib.contextmanager
def explicit_syncs(calls_cuda: bool | None = None) -> Iterator[SyncCount]:
    """Count explicit device syncs inside the block (see the module docstring).

    calls_cuda: let the wrapped functions really synchronize (default: when CUDA is available). The profile
    hook is per thread: on CUDA, release hooks run on the autograd device thread, where the wrappers count.
    """
    count = SyncCount()
    calls_cuda = torch.cuda.is_available() if calls_cuda is None else calls_cuda

    def counted(real, name):
        def synchronize(*args, **kwargs):
            outermost = getattr(_depth, "n", 0) == 0
            if outermost:
                count.explicit += 1
                count.where.append(f"explicit: {name} from {_site(sys._getframe(1))}")
            _depth.n = getattr(_depth, "n", 0) + 1
            try:
                return real(*args, **kwargs) if calls_cuda else None
            finally:
                _depth.n -= 1

        return synchronize

    patches = [(torch.cuda, "synchronize", "torch.cuda.synchronize"),
               (torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize"),
               (torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in patches]
    wrappers = set()
    for owner, attr, name in patches:
        wrapper = counted(getattr(owner, attr), name)
        wrappers.add(wrapper.__code__)
        setattr(owner, attr, wrapper)
    active: list = []  # frames of counted sync functions entered through the profile hook

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_name not in SYNC_FUNCTION_NAMES or code in wrappers:
            return
        if event == "call":
            if getattr(_depth, "n", 0) == 0:
                count.explicit += 1
                count.where.append(f"explicit: {code.co_name} ({code.co_filename}:{code.co_firstlineno}) from "
                                   f"{_site(frame.f_back)}")
            _depth.n = getattr(_depth, "n", 0) + 1
            active.append(frame)
        elif event == "return" and active and active[-1] is frame:
            active.pop()
            _depth.n -= 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield count
    finally:
        sys.setprofile(previous)
        for owner, attr, real in saved:
            setattr(owner, attr, real)


def _allowed_host_read(frame) -> bool:
    """torch.optim's `_get_value` reads the (non-capturable) Adam step counter, a CPU tensor even on CUDA."""
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_name == "_get_value" and "torch/optim" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def cpu_host_reads() -> Iterator[SyncCount]:
    """Count the tensor values read on the host inside the block (CPU stand-in for implicit syncs)."""
    count = SyncCount()
    real = {name: getattr(torch.Tensor, name) for name in HOST_READ_METHODS}

    def reading(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if not _allowed_host_read(caller):
                count.implicit += 1
                count.where.append(f"host read: Tensor.{name} from {_site(caller)}")
            return real[name](self, *args, **kwargs)

        return read

    for name in HOST_READ_METHODS:
        setattr(torch.Tensor, name, reading(name))
    try:
        yield count
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


def cpu_syncs(fn: Callable[[], object]) -> SyncCount:
    """Host reads + explicit syncs of one call of fn on the CPU: what would synchronize on CUDA."""
    with cpu_host_reads() as reads, explicit_syncs(calls_cuda=False) as explicit:
        fn()
    return SyncCount(reads.implicit, explicit.explicit, reads.where + explicit.where)


def count_syncs(fn: Callable[[], object]) -> SyncCount:
    """Implicit (sync debug mode warnings) + explicit syncs of one call of fn on CUDA."""
    with explicit_syncs() as explicit:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    implicit = [w for w in caught if "synchroniz" in str(w.message)]
    where = [f"implicit: {w.filename}:{w.lineno}" for w in implicit]
    return SyncCount(len(implicit), explicit.explicit, where + explicit.where)


def sync_free(fn: Callable[[], object]) -> str:
    """PASS if one call of fn makes no sync on CUDA: it runs under set_sync_debug_mode("error") (implicit syncs
    raise) and calls no explicit synchronize (which that mode does not see); else FAIL and why."""
    with explicit_syncs() as explicit:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            return f"FAIL: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if explicit.explicit:
        return f"FAIL: {explicit.explicit} explicit synchronize call(s), first {explicit.where[0]}"
    return "PASS"
