"""Stateless seeds: every random draw in qtrain is a pure function of (run seed, tensor, step).

Nothing random is checkpointed: a resumed run, another rank or another world size redraws exactly the
same projections and stochastic-rounding noise from these integers.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's constants


def mix_rounds(*values: int) -> int:
    """The 64-bit hash state after one splitmix64 round per value (qtrain.core.step_state continues it on the device)."""
    h = GOLDEN
    for v in values:
        h = (h ^ (v & MASK64)) & MASK64
        h = (h + GOLDEN) & MASK64
        h = ((h ^ (h >> 30)) * MIX1) & MASK64
        h = ((h ^ (h >> 27)) * MIX2) & MASK64
        h ^= h >> 31
    return h


def mix_seed(*values: int) -> int:
    """splitmix64-style hash of integers -> a seed in [0, 2^63). Stateless: resume-safe, order-free."""
    return mix_rounds(*values) >> 1


def name_uid(name: str) -> int:
    """A stable integer id of a parameter's qualified name (Python's hash() is salted per process)."""
    h = 0xCBF29CE484222325  # FNV-1a 64
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h >> 1


def update_seed(run_seed: int, uid: int, step: int) -> int:
    """The SR seed of one update of one tensor, in [0, 2^31): stateless, so a resumed run redraws it."""
    return mix_seed(run_seed, uid, step) >> 32  # mix_seed gives 63 bits; tl.rand takes an int32 seed


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A fresh generator on `device` (CPU and CUDA draw different numbers for one seed)."""
    return torch.Generator(device=device).manual_seed(seed)
