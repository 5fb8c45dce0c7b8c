"""Fira-Adam (docs/algorithms.md §8; `optimizer_torch/fira_adamw.py`): GaLore plus the scaled residual outside span P.

The low-rank part is GaLore's α·P·N; the residual S = Ĝ − ζ·P·R is scaled per channel by APOLLO's
factor s_j = ‖N[:, j]‖/‖R[:, j]‖ and passed through the norm-growth limiter. State: GaLore's + φ:
ra + 2rb + 1 floats.

Deviation (§8, ambiguity A5 in §18): the paper's residual is (I − PPᵀ)G (ζ = 1), the official code
subtracts the α-scaled back-projection (ζ = α). Default `fira_residual="official"` (ζ = α) reproduces
the published numbers; "paper" gives ζ = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.optim.base import F32, DirectionBytes, Method, Update
from qtrain.optim.galore import check_low_rank, projected_adam_, stored_projection_state
from qtrain.optim.hyperparams import check_choice, check_range
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.projection import orient
from qtrain.optim.svd_projection import orient_back, refresh_due, refresh_projection_, svd_refresh_bytes

FIRA_RESIDUALS = ("official", "paper")


def fira_residual(g_hat: Tensor, proj: Tensor, r: Tensor, zeta: float) -> Tensor:
    """S = Ĝ − ζ·P R (a×b fp32; R = PᵀĜ (r×b)). ζ = 1: the part of Ĝ outside span P (§8 step 6)."""
    return g_hat - zeta * (proj @ r)  # (a, r) @ (r, b) -> (a, b)


def fira_update(
    g_hat: Tensor, proj: Tensor, m: Tensor, v: Tensor, phi: Tensor, step: int, *, betas: tuple[float, float],
    eps: float, scale: float, zeta: float, gamma: float = 1.01,
) -> Tensor:
    """One Fira-Adam direction D̂ = κ_t (α·P N + NL(S·Diag(s))) (a×b, fp32) (§8 steps 1-9).

    g_hat: Ĝ (a×b) fp32; proj: P (a×r); m, v: (r×b) and phi (0-dim, NL state) updated in place.
    """
    r, n = projected_adam_(g_hat, proj, m, v, betas=betas, eps=eps)  # (r, b) each        §8 steps 1-4
    s = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)  # (b,) channel factors, as APOLLO          §8 step 5
    y = fira_residual(g_hat, proj, r, zeta).mul_(s)  # S·Diag(s): column j times s_j (a, b)  §8 steps 6-7
    eta, new_phi = norm_growth_factor(y.norm(), phi, first=step == 1, gamma=gamma)  # NL on the residual only
    phi.copy_(new_phi)
    b1, b2 = betas
    kappa = math.sqrt(1 - b2**step) / (1 - b1**step)
    u = (proj @ n).mul_(scale).add_(y.mul_(eta))  # Û = α·P N + Y (α scales only the low-rank part)  §8 step 8
    return u.mul_(kappa)  #                                                               §8 step 9


@dataclass
class FiraMethod(Method):
    """Fira-Adam hyperparameters (§8 defaults: lr 0.01, α 0.25 up to 350M, 0.0625 at 1B/7B, T 200)."""

    rank: int = 128
    galore_scale: float = 0.25
    update_proj_gap: int = 200
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    gamma: float = 1.01
    fira_residual: str = "official"
    i3s: bool = False
    seed: int = 0

    @property
    def zeta(self) -> float:
        return self.galore_scale if self.fira_residual == "official" else 1.0

    def validate(self, shape: tuple[int, ...]) -> None:
        check_low_rank("Fira", shape, self.rank, self.update_proj_gap, self.betas, self.eps)
        check_range("Fira", "galore_scale", self.galore_scale, 0.0, lo_open=True)
        check_range("Fira", "gamma", self.gamma, 1.0)
        check_choice("Fira", "fira_residual", self.fira_residual, FIRA_RESIDUALS)

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        return stored_projection_state(shape, self.rank, device, uid, limiter=True)

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        if refresh_due(t, self.update_proj_gap):
            refresh_projection_(state["proj"], grad, i3s=self.i3s, seed=self.seed, uid=state["uid"],
                                window=(t - 1) // self.update_proj_gap)
        d_hat = fira_update(
            orient(grad.float()), state["proj"], state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"], t,
            betas=self.betas, eps=self.eps, scale=self.galore_scale, zeta=self.zeta, gamma=self.gamma,
        )
        return Update(dense=orient_back(d_hat, tuple(grad.shape)))

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Approximate: the dense fp32 direction (m x n) and, at a refresh, the SVD's transients."""
        full = F32 * shape[0] * shape[1]
        return DirectionBytes(full + svd_refresh_bytes(shape), full, False)


class Fira(MethodOptimizer):
    """Fira-Adam as a torch optimizer; 2-D params of groups with rank != None get Fira, others Adam.

    Example: Fira(params, lr=0.01, rank=128, galore_scale=0.25, update_proj_gap=200, fira_residual="official")
    """

    method_cls = FiraMethod

    def __init__(
        self, params, lr: float = 0.01, rank: int | None = 128, galore_scale: float = 0.25,
        update_proj_gap: int = 200, betas=(0.9, 0.999), eps: float = 1e-6, gamma: float = 1.01,
        fira_residual: str = "official", weight_decay: float = 0.0, i3s: bool = False, seed: int = 0,
    ):
        defaults = dict(lr=lr, rank=rank, galore_scale=galore_scale, update_proj_gap=update_proj_gap, betas=betas,
                        eps=eps, gamma=gamma, fira_residual=fira_residual, weight_decay=weight_decay, i3s=i3s,
                        seed=seed)
        super().__init__(params, defaults)
