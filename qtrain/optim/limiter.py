"""Norm-growth limiter (NL, Fira; APOLLO [001] Eq. 4; docs/algorithms.md §2), on device with no host sync."""

from __future__ import annotations

from torch import Tensor


def norm_growth_factor(norm: Tensor, prev_norm: Tensor, first: bool, gamma: float = 1.01) -> tuple[Tensor, Tensor]:
    """Factor η that caps ‖ηX‖ <= γ(φ + 1e-8), and the norm to store (after limiting).

    norm = ‖X‖ (0-dim), prev_norm = φ of the last applied tensor (0-dim), first: no φ yet.
    η = 1 / max(ρ/γ, 1) with ρ = ‖X‖/(φ + 1e-8): only growth beyond γ is cut, a norm never increases.
    """
    if first:
        return norm.new_ones(()), norm
    eta = 1.0 / (norm / (prev_norm + 1e-8) / gamma).clamp_min(1.0)  # clamp_min, not Python max: no sync
    return eta, norm * eta
