"""Orientation (docs/algorithms.md §0) and the random projection regenerated from a seed (§3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qtrain.core.seeding import mix_seed, seeded_generator


def orient(grad: Tensor) -> Tensor:
    """Ĝ (a×b): G itself if m < n, else Gᵀ (a view; square matrices take the transposed branch)."""
    m, n = grad.shape
    return grad if m < n else grad.t()


def channel_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape that broadcasts a per-channel factor (length b) against the un-oriented G."""
    m, n = shape
    return (1, n) if m < n else (m, 1)


def official_next_seed(seed: int) -> int:
    """APOLLO's `next_seed`: seed a CPU generator, draw 15 int64 in [0, 2^63 - 1), keep the last."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=g)[-1])


def window_seed(global_seed: int, uid: int, window: int) -> int:
    """qtrain's stateless per-(run, tensor, window) projection seed."""
    return mix_seed(global_seed, uid, window)


def random_projection(shape: tuple[int, int], rank: int, seed: int, device: torch.device) -> Tensor:
    """P (a×r), entries N(0, 1/r), drawn exactly as the official projector for the same seed.

    Official draw shape: (a, r) when m < n ("left"), (r, a) when m >= n ("right", used transposed).
    """
    m, n = shape
    a = min(m, n)
    gen = seeded_generator(device, seed)
    p = torch.randn((a, rank) if m < n else (rank, a), generator=gen, device=device, dtype=torch.float32)
    if rank > 1:  # / sqrt(1) is the identity: APOLLO-Mini saves one kernel launch per tensor and step
        p = p / math.sqrt(rank)
    return p if m < n else p.t()
