"""The learning-rate schedule every source paper uses (APOLLO repo `utils/training_utils.py`; docs/algorithms.md §0)."""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """W, the number of warmup updates: round(warmup_frac * N)."""
    return round(warmup_frac * total_steps)


def lr_at(k: int, base_lr: float, total_steps: int, warmup_frac: float = 0.1, min_ratio: float = 0.1) -> float:
    """LR of the update with index k (k = 0 for the first update): linear warmup, cosine to min_ratio.

    1. warmup W = round(warmup_frac * N) steps: lr * k / W (so the first update runs at 0)
    2. then lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * (k - W) / (N - W))) / 2)
    3. past N (a run extended on resume): stays at lr * min_ratio
    One schedule for all tensors, advanced once per optimizer update (the official per-layer mode
    builds per-tensor schedulers with 2x steps: §17.1).
    """
    warmup = warmup_steps(total_steps, warmup_frac)
    if k < warmup:
        return base_lr * k / warmup
    if k >= total_steps:
        return base_lr * min_ratio
    progress = (k - warmup) / max(1, total_steps - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
