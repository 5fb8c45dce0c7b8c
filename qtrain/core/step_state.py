"""The per-step values of an update (step number, LRs, SR seeds) as device tensors the kernels read.

A kernel that takes the LR or a seed as a Python number bakes it into its launch: a CUDA graph captured
once would replay that step's LR and stochastic-rounding noise forever. `StepState` holds them in 0-d / 1-d
device tensors that `set()` rewrites in place before each step (outside any captured region), so the
kernels read each step's values through pointers and a replay sees them.

`StepValue` pairs a value's host form with its device form: the torch references (the CPU path) keep using
the host number (a torch.Generator needs a host seed; their numbers stay what they were), the Triton kernels
take the device tensor. The seeds are qtrain.core.seeding.update_seed, evaluated on the device: the first two
splitmix rounds (run seed, tensor) are per-tensor constants mixed on the host once, the last one (step) is
~15 elementwise int64 ops over all tensors at once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qtrain.core.seeding import GOLDEN, MIX1, MIX2, mix_rounds, name_uid, update_seed


class StepValue(NamedTuple):
    """One per-step value: `host` for the torch references, `device` (a 0-d tensor) for the kernels."""

    host: Any
    device: Tensor


def device_form(v: Any) -> Any:
    """What a kernel takes: a StepValue's device tensor, anything else as it is."""
    return v.device if isinstance(v, StepValue) else v


def host_form(v: Any) -> Any:
    """What a torch reference takes: a StepValue's host number, anything else as it is."""
    return v.host if isinstance(v, StepValue) else v


def _signed(u: int) -> int:
    """uint64 -> the int64 with the same bits (torch has no uint64 arithmetic)."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shr(h: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> sign-extends)."""
    return (h >> k) & ((1 << (64 - k)) - 1)


def device_update_seeds(partial: Tensor, step: Tensor) -> Tensor:
    """update_seed(run_seed, uid, step) for a vector of tensors on the device: the last splitmix round.

    partial: int64 (n,), the hash state after (run seed, uid) (mix_rounds); step: int64 0-d. int64 products
    wrap like the uint64 ones of seeding.mix_seed (two's complement), so the bits are the same.
    """
    h = (partial ^ step) + _signed(GOLDEN)
    h = (h ^ _shr(h, 30)) * _signed(MIX1)
    h = (h ^ _shr(h, 27)) * _signed(MIX2)
    h = h ^ _shr(h, 31)
    return _shr(h, 33)  # mix_seed's >> 1, then update_seed's >> 32: [0, 2^31)


class StepState:
    """The update in flight (t, 1-based), the LRs and every tensor's SR seed, on `device`.

    names: the tensors that draw SR noise (qualified names, plus the fused groups' names), in a fixed order.
    """

    def __init__(self, device: torch.device | str, run_seed: int, names: Iterable[str]):
        self.run_seed = run_seed
        self.t = torch.zeros((), dtype=torch.int64, device=device)
        # fp64: Adam's lr / (1 - β1^t) is formed in fp64 on the host; kernels round the LR to fp32 as at launch
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.float_lr = torch.zeros((), dtype=torch.float64, device=device)
        self.host_t, self.host_lr, self.host_float_lr = 0, 0.0, 0.0
        self.index = {name: i for i, name in enumerate(dict.fromkeys(names))}
        partial = [_signed(mix_rounds(run_seed, name_uid(n))) for n in self.index]
        self._partial = torch.tensor(partial, dtype=torch.int64).to(device)  # once, at construction
        self.seeds = torch.zeros(len(partial), dtype=torch.int64, device=device)
        self._derived: dict[Any, tuple[Callable[[Tensor], Tensor], Tensor]] = {}

    def set(self, t: int, lr: float, float_lr: float) -> None:
        """The values of update t, written in place (a replayed graph reads these very tensors).

        A handful of small launches; fill_ passes the number by value, so nothing waits for the device.
        """
        self.host_t, self.host_lr, self.host_float_lr = t, lr, float_lr
        self.t.fill_(t)
        self.lr.fill_(lr)
        self.float_lr.fill_(float_lr)
        self.seeds.copy_(device_update_seeds(self._partial, self.t - 1))  # seeded by updates completed, t - 1
        for fn, out in self._derived.values():
            out.copy_(fn(self.t))

    def seed(self, name: str) -> StepValue:
        """The SR seed of `name` in this update (update_seed(run seed, tensor, t - 1))."""
        return StepValue(update_seed(self.run_seed, name_uid(name), self.host_t - 1), self.seeds[self.index[name]])

    def derived(self, key: Any, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """fn(t) on the device, recomputed in place by every set(): per-step constants such as Adam's bias
        corrections, computed once per step for every tensor that shares `key`."""
        if key not in self._derived:
            self._derived[key] = (fn, fn(self.t))
        return self._derived[key][1]

    @property
    def lr_value(self) -> StepValue:
        return StepValue(self.host_lr, self.lr)

    @property
    def float_lr_value(self) -> StepValue:
        return StepValue(self.host_float_lr, self.float_lr)
