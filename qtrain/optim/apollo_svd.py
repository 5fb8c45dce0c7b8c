"""APOLLO with an SVD projection (APOLLO-SVD, docs/algorithms.md §6; apollo-torch `proj="svd"`).

APOLLO's channel-wise (or tensor-wise) scaling of the raw gradient (§4, `apollo_scaling`), with P
the top-r singular vectors of G (§0 SVD convention) refreshed every T steps and stored, instead
of a seeded random matrix. State: P (a×r), M, V (r×b), φ: ra + 2rb + 1 floats (§4's 2rb + 1 plus the
stored P; §6: GaLore's state plus the limiter's one float).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.optim.apollo import BIAS_CORRECTION_MODES, SCALE_TYPES, ApolloScaling, apollo_scaling
from qtrain.optim.base import F32, DirectionBytes, Update
from qtrain.optim.galore import check_low_rank, stored_projection_state
from qtrain.optim.hyperparams import check_choice, check_range
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.projection import channel_shape, orient
from qtrain.optim.svd_projection import refresh_due, refresh_projection_, svd_refresh_bytes


@dataclass
class ApolloSVDMethod(ApolloScaling):
    """APOLLO-SVD: APOLLO's hyperparameters (§6: α = 1 below 1B, 0.4 at 1B), P stored and refreshed by SVD."""

    measures_grad_norm = True  # apollo_scaling's column norms give ‖G‖ (direction's norm_out)

    def validate(self, shape: tuple[int, ...]) -> None:
        check_low_rank("APOLLO-SVD", shape, self.rank, self.update_proj_gap, self.betas, self.eps)
        check_range("APOLLO-SVD", "scale", self.scale, 0.0, lo_open=True)
        check_range("APOLLO-SVD", "gamma", self.gamma, 1.0)
        check_choice("APOLLO-SVD", "scale_type", self.scale_type, SCALE_TYPES)
        check_choice("APOLLO-SVD", "bias_correction", self.bias_correction, BIAS_CORRECTION_MODES)

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        return stored_projection_state(shape, self.rank, device, uid, limiter=True)

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None,
                  norm_out: Tensor | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        if refresh_due(t, self.update_proj_gap):  # top-r singular vectors of G                §6
            refresh_projection_(state["proj"], grad, i3s=False, seed=self.seed, uid=state["uid"],
                                window=(t - 1) // self.update_proj_gap)
        f = apollo_scaling(
            orient(grad.float()), state["proj"], state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"], t,
            betas=self.betas, eps=self.eps, scale=self.scale, scale_type=self.scale_type,
            bias_correction=self.bias_correction, gamma=self.gamma, scale_front=self.scale_front, norm_out=norm_out,
        )
        if self.scale_type == "channel":
            f = f.reshape(channel_shape(tuple(grad.shape)))
        return Update(grad_scale=f)

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Approximate: the SVD refresh's transients, then R and the moment temporaries (3 x r x b in fp32);
        the update is a multiplier of the gradient (no dense direction)."""
        return DirectionBytes(svd_refresh_bytes(shape) + 3 * F32 * self.rank * max(shape), 0, False)


class APOLLOSVD(MethodOptimizer):
    """APOLLO-SVD as a torch optimizer; 2-D params of groups with rank != None get it, others Adam.

    Example: APOLLOSVD(params, lr=0.01, rank=256, scale=1.0, update_proj_gap=200)
    Same numbers as apollo-torch's APOLLOAdamW with group keys proj="svd", proj_type="std".
    """

    method_cls = ApolloSVDMethod

    def __init__(
        self, params, lr: float = 0.01, rank: int | None = 256, scale: float = 1.0, scale_type: str = "channel",
        update_proj_gap: int = 200, betas=(0.9, 0.999), eps: float = 1e-6, bias_correction: str = "outside",
        gamma: float = 1.01, weight_decay: float = 0.0, seed: int = 0, scale_front: bool = False,
    ):
        defaults = dict(lr=lr, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=update_proj_gap,
                        betas=betas, eps=eps, bias_correction=bias_correction, gamma=gamma,
                        weight_decay=weight_decay, seed=seed, scale_front=scale_front)
        super().__init__(params, defaults)
