"""GaLore-Adam (docs/algorithms.md §7; `galore_torch/adamw.py`, [003] Eq. 1), optionally with I3S subspaces (§9).

Adam runs on R = PᵀĜ (r×b) with P the top-r singular vectors of G (refreshed every T steps, moments
neither reset nor rotated), and the update is the back-projection α·P·N: rank <= r, confined to span P.
State: P (a×r), M, V (r×b), all fp32: ra + 2rb floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.optim.base import F32, DirectionBytes, Method, Update
from qtrain.optim.hyperparams import check_betas, check_matrix_rank, check_range
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.projection import orient
from qtrain.optim.svd_projection import orient_back, refresh_due, refresh_projection_, svd_refresh_bytes


def projected_adam_(
    g_hat: Tensor, proj: Tensor, m: Tensor, v: Tensor, *, betas: tuple[float, float], eps: float
) -> tuple[Tensor, Tensor]:
    """Adam moments on the projected gradient (§7 steps 2-4; shared with Fira §8).

    g_hat: Ĝ (a×b) fp32; proj: P (a×r) fp32; m, v: (r×b) fp32, updated in place.
    Returns (R = PᵀĜ (r×b), N = M ⊘ (√V + ε) (r×b)); no bias correction here (κ_t goes on the step).
    """
    b1, b2 = betas
    r = proj.t() @ g_hat  # (r, b)                                 §7 step 2
    m.mul_(b1).add_(r, alpha=1 - b1)  #                            §7 step 3
    v.mul_(b2).addcmul_(r, r, value=1 - b2)
    n = m / (v.sqrt() + eps)  # (r, b), ε outside the sqrt         §7 step 4
    return r, n


def galore_update(
    g_hat: Tensor, proj: Tensor, m: Tensor, v: Tensor, step: int, *, betas: tuple[float, float], eps: float,
    scale: float,
) -> Tensor:
    """One GaLore-Adam direction D̂ = κ_t · α · P N (a×b, fp32); W <- W − λ_t D (§7 steps 2-6).

    Updates m, v in place. α = `scale` is linear (0.25 means ×0.25), unlike APOLLO's √scale.
    """
    _, n = projected_adam_(g_hat, proj, m, v, betas=betas, eps=eps)
    b1, b2 = betas
    kappa = math.sqrt(1 - b2**step) / (1 - b1**step)  # official bias correction on the step ([003] Eq. 1 has none)
    return (proj @ n).mul_(scale * kappa)  # (a, r) @ (r, b) -> (a, b)            §7 steps 5-6


def check_low_rank(method: str, shape: tuple[int, ...], rank: int, gap: int, betas, eps: float) -> None:
    """Checks shared by the SVD-projected methods (GaLore, Fira, APOLLO-SVD)."""
    check_matrix_rank(method, rank, shape)
    check_range(method, "update_proj_gap", gap, 1)
    check_betas(method, "betas", betas, 2)
    check_range(method, "eps", eps, 0.0)


def stored_projection_state(shape: tuple[int, ...], rank: int, device, uid: int, limiter: bool) -> dict[str, Any]:
    """State of a method with a stored projection: P (a, r), moments M, V (r, b), optionally φ (NL)."""
    a, b = min(shape), max(shape)
    zeros = torch.zeros((rank, b), device=device, dtype=torch.float32)  # (r, b)
    state = {
        "step": 0,
        "uid": uid,
        "proj": torch.zeros((a, rank), device=device, dtype=torch.float32),  # P (a, r), set at t = 1
        "exp_avg": zeros,
        "exp_avg_sq": zeros.clone(),
    }
    if limiter:
        state["limiter_norm"] = torch.zeros((), device=device, dtype=torch.float32)  # φ
    return state


@dataclass
class GaLoreMethod(Method):
    """GaLore-Adam hyperparameters (§7 defaults: lr 0.01, α 0.25, T 200; rank 128 at 60M, 256 at 130M/350M).

    i3s=True samples the subspace by importance (§9) from a generator seeded with
    mix_seed(seed, uid, window) instead of taking the top r singular vectors.
    """

    rank: int = 128
    galore_scale: float = 0.25
    update_proj_gap: int = 200
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    i3s: bool = False
    seed: int = 0

    def validate(self, shape: tuple[int, ...]) -> None:
        check_low_rank("GaLore", shape, self.rank, self.update_proj_gap, self.betas, self.eps)
        check_range("GaLore", "galore_scale", self.galore_scale, 0.0, lo_open=True)

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        return stored_projection_state(shape, self.rank, device, uid, limiter=False)

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        if refresh_due(t, self.update_proj_gap):  # t = 1, T+1, 2T+1, ...            §7 step 1
            refresh_projection_(state["proj"], grad, i3s=self.i3s, seed=self.seed, uid=state["uid"],
                                window=(t - 1) // self.update_proj_gap)
        d_hat = galore_update(orient(grad.float()), state["proj"], state["exp_avg"], state["exp_avg_sq"], t,
                              betas=self.betas, eps=self.eps, scale=self.galore_scale)
        return Update(dense=orient_back(d_hat, tuple(grad.shape)))

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Approximate: the dense fp32 direction (m x n) and, at a refresh, the SVD's transients."""
        full = F32 * shape[0] * shape[1]
        return DirectionBytes(full + svd_refresh_bytes(shape), full, False)


class GaLore(MethodOptimizer):
    """GaLore-Adam as a torch optimizer; 2-D params of groups with rank != None get GaLore, others Adam.

    Example: GaLore(params, lr=0.01, rank=128, galore_scale=0.25, update_proj_gap=200, i3s=False)
    Same numbers as galore-torch's GaLoreAdamW with group keys rank, update_proj_gap, scale, proj_type="std".
    """

    method_cls = GaLoreMethod

    def __init__(
        self, params, lr: float = 0.01, rank: int | None = 128, galore_scale: float = 0.25,
        update_proj_gap: int = 200, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
        i3s: bool = False, seed: int = 0,
    ):
        defaults = dict(lr=lr, rank=rank, galore_scale=galore_scale, update_proj_gap=update_proj_gap, betas=betas,
                        eps=eps, weight_decay=weight_decay, i3s=i3s, seed=seed)
        super().__init__(params, defaults)
