"""Adam for the float tensors (embedding, norms, lm_head): bitsandbytes 8-bit or torch AdamW.

One optimizer per tensor, so a release hook can step exactly one tensor (torchtune's optimizer-in-
backward pattern). Both run on CPU and CUDA. bitsandbytes keeps tensors under 4096 elements in 32 bit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

FLOAT_OPTIMIZERS = ("adam8bit", "adamw")


def float_optimizer_factory(
    name: str, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> Callable[[nn.Parameter], torch.optim.Optimizer]:
    """Returns p -> optimizer over [p]. The LR is set per step by the caller (lr=0 here)."""
    if name == "adam8bit":
        import bitsandbytes as bnb  # imported lazily: its CUDA probing is slow and noisy

        return lambda p: bnb.optim.Adam8bit([p], lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return lambda p: torch.optim.AdamW([p], lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    raise ValueError(f"[optim] float_optimizer = {name!r} is unknown; choose one of {FLOAT_OPTIMIZERS}")
