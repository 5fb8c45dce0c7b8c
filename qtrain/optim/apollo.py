"""APOLLO (channel-wise, rank r) and APOLLO-Mini (tensor-wise, rank 1): docs/algorithms.md §4, §5; [001] Alg. 1.

Adam runs on the random projection R = PᵀĜ (r×b); its only use is the ratio s = ‖N‖/‖R‖ per channel
(or per tensor), which rescales the *raw* gradient: the update is full rank, the state is 2·r·b floats.
P is never stored: it is regenerated from a seed every step (§3).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.errors import HyperparameterError
from qtrain.optim import apollo_kernels
from qtrain.optim.base import F32, DirectionBytes, Method, Update
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.projection import (
    channel_shape,
    official_next_seed,
    orient,
    random_projection,
    window_seed,
)
from qtrain.quant import dispatch

BIAS_CORRECTION_MODES = ("outside", "inside")
SCALE_TYPES = ("channel", "tensor")


def project_with_column_norms(proj: Tensor, g_hat: Tensor, max_chunk_elems: int = 1 << 22, *, width: int = 0,
                              first_column: int = 0) -> tuple[Tensor, Tensor]:
    """R = PᵀĜ (r×b) and the squared column norms of Ĝ (b,), in fp32, reading Ĝ in row chunks.

    A bf16 gradient is upcast one chunk at a time, never as a whole fp32 copy (for a 32000×4096
    embedding gradient that copy alone would be 500 MiB).
    width, first_column: Ĝ is the columns first_column.. of an oriented gradient `width` wide (one rank's
    block under FSDP2, qtrain.parallel.apollo_sharded); the results are then those columns of the whole
    gradient's, bit for bit (same chunk rows; see _column_squares).
    """
    a, b = g_hat.shape
    rows = max(1, max_chunk_elems // (width or b))
    r = torch.zeros((proj.shape[1], b), device=g_hat.device, dtype=torch.float32)
    col_sq = torch.zeros(b, device=g_hat.device, dtype=torch.float32)
    for i in range(0, a, rows):
        chunk = g_hat[i : i + rows].float()  # (rows, b)
        r.addmm_(proj[i : i + rows].t(), chunk)  # a column of R does not depend on the other columns
        col_sq.add_(_column_squares(chunk, width or b, first_column))
    return r, col_sq


def _column_squares(chunk: Tensor, width: int, first_column: int) -> Tensor:
    """Σ_rows chunk², as the columns first_column.. of a chunk `width` wide would sum them.

    torch's CPU sum over dim 0 of a row-contiguous chunk vectorizes across columns by their position in the
    row, so a block that is not a whole number of vectors would sum its last columns in another order: such a
    block is summed at its place in a zero row as wide as the whole one (one chunk-sized buffer).
    """
    b = chunk.shape[1]
    if b == width or chunk.stride(-1) != 1 or chunk.device.type != "cpu":  # CUDA: not bit-matched anyway
        return chunk.square().sum(dim=0)
    wide = chunk.new_zeros((chunk.shape[0], width))
    wide[:, first_column : first_column + b] = chunk
    return wide.square_().sum(dim=0)[first_column : first_column + b]


def update_moments_(r: Tensor, m: Tensor, v: Tensor, step: int, *, betas: tuple[float, float], eps: float,
                    bias_correction: str) -> tuple[Tensor, float]:
    """Steps 5-6 of APOLLO: Adam's moments of R, updated in place (elementwise), and N with its step factor κ."""
    b1, b2 = betas
    c1, c2 = 1 - b1**step, 1 - b2**step
    m.mul_(b1).add_(r, alpha=1 - b1)  #                                step 5
    v.mul_(b2).addcmul_(r, r, value=1 - b2)
    if bias_correction == "outside":  # apollo.py: ε outside, κ_t on the step size    step 6
        return m / (v.sqrt() + eps), math.sqrt(c2) / c1
    # q_apollo.py (bitsandbytes kernel): bias correction inside, NL sees the κ_t ramp
    return (m / c1) / ((v / c2).sqrt() + eps), 1.0


def scale_factor(n: Tensor, r: Tensor, col_sq: Tensor, phi: Tensor, step: int, step_factor: float, *, scale: float,
                 scale_type: str, gamma: float = 1.01, scale_front: bool = False) -> Tensor:
    """Steps 7-11 of APOLLO from N, R and ‖Ĝ[:, j]‖²: the factor f; updates phi (NL state) in place. Every norm
    spans whole columns or the whole tensor (FSDP2 gathers N, R and col_sq before calling it: qtrain.parallel.fsdp).

    scale_front (the official --scale_front): α multiplies X before NL (step 10 before 9), so φ holds α‖X‖. NL is
    homogeneous, so this changes nothing except through its 1e-8 guard, i.e. when φ ≈ 0 (after an all-zero
    gradient): the limited update is then α times smaller with scale_front (docs/algorithms.md §2).
    """
    if scale_type == "channel":  # s_j = ‖N[:, j]‖ / (‖R[:, j]‖ + 1e-8)   step 7
        s = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)  # (b,)
        x_norm = (s.square() * col_sq).sum().sqrt()  # ‖Ĝ Diag(s)‖ without forming it
    else:  # APOLLO-Mini: one s for the tensor   step 7'
        s = n.norm() / (r.norm() + 1e-8)  # ()
        x_norm = s * col_sq.sum().sqrt()
    alpha = math.sqrt(scale)
    if scale_front:  # step 10 first: NL sees α‖X‖
        x_norm = x_norm * alpha
    eta, new_phi = norm_growth_factor(x_norm, phi, first=step == 1, gamma=gamma)  # step 9
    phi.copy_(new_phi)
    return s * (eta * (alpha * step_factor))  # steps 10-11: α = √scale


def scaling_chain(
    r: Tensor, col_sq: Tensor, m: Tensor, v: Tensor, phi: Tensor, step: int, *, betas: tuple[float, float],
    eps: float, scale: float, scale_type: str, bias_correction: str, gamma: float = 1.01, scale_front: bool = False,
) -> Tensor:
    """Steps 5-11 of APOLLO on the statistics R = PᵀĜ (r×b) and ‖Ĝ[:, j]‖² (b,): the torch reference of
    apollo_kernels.scaling_chain_triton. Updates m, v and phi in place and returns the factor f."""
    n, step_factor = update_moments_(r, m, v, step, betas=betas, eps=eps, bias_correction=bias_correction)
    return scale_factor(n, r, col_sq, phi, step, step_factor, scale=scale, scale_type=scale_type, gamma=gamma,
                        scale_front=scale_front)


def apollo_scaling(
    g_hat: Tensor,
    proj: Tensor,
    m: Tensor,
    v: Tensor,
    phi: Tensor,
    step: int,
    *,
    betas: tuple[float, float],
    eps: float,
    scale: float,
    scale_type: str,
    bias_correction: str,
    gamma: float = 1.01,
    scale_front: bool = False,
    backend: str = "auto",
    step_constants: Tensor | None = None,
    norm_out: Tensor | None = None,
) -> Tensor:
    """One APOLLO step on the oriented gradient Ĝ (a×b, fp32 or bf16) with projection P (a×r, fp32).

    Updates m, v (r×b) and phi (0-dim, NL state) in place. Returns the factor f with D = Ĝ·Diag(f)
    (f of shape (b,), channel) or D = f·Ĝ (f 0-dim, tensor), including NL, α = √scale and, in mode
    "outside", κ_t. The full-size X = Ĝ·Diag(s) is never formed: ‖X‖ comes from column norms.
    backend (qtrain.quant.dispatch's convention): "auto" runs the two fused Triton kernels of
    apollo_kernels when every tensor is on CUDA, the torch reference otherwise (CPU numbers unchanged).
    step_constants: `step_constants(t, ...)` on the device; the kernels read the bias corrections and the first
    step from it (capturable), the reference uses the host `step` (the same numbers).
    norm_out: a 0-d fp32 tensor that receives ‖Ĝ‖ = √Σ‖Ĝ[:, j]‖², from the column norms step 4 computes anyway
    (the chain kernel writes it: no launch of its own).
    """
    hyper = dict(betas=betas, eps=eps, scale=scale, scale_type=scale_type, bias_correction=bias_correction,
                 gamma=gamma, scale_front=scale_front)
    if dispatch.use_triton(backend, (g_hat, proj, m, v, phi), apollo_kernels.problems(g_hat, proj, m),
                           "the fused APOLLO statistics"):
        r, col_sq = apollo_kernels.project_with_column_norms_triton(proj, g_hat)
        return apollo_kernels.scaling_chain_triton(r, col_sq, m, v, phi, step, step_constants=step_constants,
                                                   norm_out=norm_out, **hyper)
    r, col_sq = project_with_column_norms(proj, g_hat)  # (r, b), (b,)    step 4
    if norm_out is not None:
        torch.sqrt(col_sq.sum(), out=norm_out)
    return scaling_chain(r, col_sq, m, v, phi, step, **hyper)


def step_constants(t: Tensor, betas: tuple[float, float], scale: float, bias_correction: str) -> Tensor:
    """fp64 (t, c1, c2, factor) of update t (a 0-d int64 device tensor): scaling_chain's per-step numbers,
    c = 1 - β^t and factor = √scale·κ_t ("outside") or √scale, with the host's fp64 operations (the same bits
    on the CPU: pow, sqrt and / are correctly rounded or the same libm call)."""
    b1, b2 = betas
    td = t.double()
    c1, c2 = 1 - b1**td, 1 - b2**td
    root = math.sqrt(scale)
    factor = root * (c2.sqrt() / c1) if bias_correction == "outside" else torch.full_like(td, root)
    return torch.stack([td, c1, c2, factor])


# project_with_column_norms' row-chunk limit (its default), for direction_bytes
PROJECT_CHUNK = inspect.signature(project_with_column_norms).parameters["max_chunk_elems"].default

@dataclass
class ApolloScaling(Method):
    """The hyperparameters of APOLLO's gradient scaling (`apollo_scaling`), shared by APOLLO and APOLLO-SVD,
    which differ only in P (seeded random vs stored top-r singular vectors). `scale` is α² (APOLLO's CLI
    convention: 128 means ×11.31)."""

    rank: int = 256
    scale: float = 1.0
    scale_type: str = "channel"
    update_proj_gap: int = 200
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    bias_correction: str = "outside"
    gamma: float = 1.01
    seed: int = 0
    scale_front: bool = False  # the official --scale_front: α before the norm-growth limiter (scale_factor)


@dataclass
class Apollo(ApolloScaling):
    """APOLLO / APOLLO-Mini: P a seeded Gaussian (a×r)/√r, regenerated from its seed, never stored."""

    accepts_low_precision_grad = True  # direction() upcasts bf16 gradients chunk by chunk itself
    measures_grad_norm = True  # direction(norm_out=) writes ‖G‖ from the statistics pass's column norms
    # Not dataclass fields: [quant] kernels' and [train] cuda_graph's choices (Method.configure), not
    # [optim.args] hyperparameters.
    # statistics backend, "auto" | "torch" | "triton" (qtrain.quant.dispatch's convention)
    kernels = "auto"
    # True ([train] cuda_graph): keep each tensor's P for its window of update_proj_gap steps and redraw it in
    # place from `prepare`, which the Updater calls before the step, outside a captured region (a per-call
    # generator cannot be captured). Costs the P's memory (a x r floats per tensor: small at rank 1)
    keep_projections = False

    def configure(self, kernels: str = "auto", keep_projections: bool = False) -> None:
        self.kernels, self.keep_projections = kernels, keep_projections

    official_seed_chain: bool = False

    def validate(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise HyperparameterError(f"APOLLO needs 2-D weights, got shape {shape}")
        if not 1 <= self.rank <= min(shape):
            raise HyperparameterError(f"APOLLO rank = {self.rank} must be in [1, {min(shape)}] for a weight of shape {shape}: "
                             f"set optim.args.rank (e.g. --set optim.args.rank={max(1, min(shape) // 4)})")
        if self.scale_type not in SCALE_TYPES:
            raise HyperparameterError(f"APOLLO scale_type = {self.scale_type!r}; allowed: {SCALE_TYPES}")
        if self.bias_correction not in BIAS_CORRECTION_MODES:
            raise HyperparameterError(f"APOLLO bias_correction = {self.bias_correction!r}; allowed: {BIAS_CORRECTION_MODES}")
        if self.update_proj_gap < 1 or self.scale <= 0:
            raise HyperparameterError(f"APOLLO needs update_proj_gap >= 1 and scale > 0, got {self.update_proj_gap}, {self.scale}")

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        b = max(shape)
        zeros = torch.zeros((self.rank, b), device=device, dtype=torch.float32)  # (r, b)
        return {
            "step": 0,
            "uid": uid,
            "proj_seed": 0,
            "exp_avg": zeros,
            "exp_avg_sq": zeros.clone(),
            "limiter_norm": torch.zeros((), device=device, dtype=torch.float32),
        }

    def projection_seed(self, state: dict[str, Any], t: int) -> int:
        window = (t - 1) // self.update_proj_gap
        if not self.official_seed_chain:
            return window_seed(self.seed, state["uid"], window)
        if (t - 1) % self.update_proj_gap == 0:  # the official chain: seed_1 = uid, then next_seed(...)
            state["proj_seed"] = state["uid"] if window == 0 else official_next_seed(state["proj_seed"])
        return state["proj_seed"]

    def projection(self, state: dict[str, Any], t: int, shape: tuple[int, int], device) -> Tensor:
        """P (a, r) of update t: drawn from its seed, or the kept one (keep_projections), redrawn in place when
        t starts a new window."""
        if not self.keep_projections:
            return random_projection(shape, self.rank, self.projection_seed(state, t), device)  # discarded after use
        kept = self._kept().get(state["uid"])
        window = (t - 1) // self.update_proj_gap
        if kept is None or kept[0] != window:
            p = random_projection(shape, self.rank, self.projection_seed(state, t), device)
            if kept is None:
                kept = (window, p.clone())  # its own memory, strides as drawn
            else:
                kept[1].copy_(p)  # in place: a captured graph reads this very buffer
                kept = (window, kept[1])
            self._kept()[state["uid"]] = kept
        return kept[1]

    def prepare(self, state: dict[str, Any], shape: tuple[int, int], t: int) -> None:
        """Before update t (outside a captured region): redraw a kept P whose window ends."""
        if self.keep_projections and state["uid"] in self._kept():
            self.projection(state, t, shape, self._kept()[state["uid"]][1].device)

    def kept_projections(self) -> dict[int, Tensor]:
        """The kept P of each tensor (by uid) while keep_projections is on: the buffers a captured step reads."""
        return {uid: p for uid, (_, p) in self._kept().items()}

    def _kept(self) -> dict[int, tuple[int, Tensor]]:
        if "_kept_p" not in self.__dict__:
            self._kept_p: dict[int, tuple[int, Tensor]] = {}  # uid -> (window, P): not a field, not saved
        return self._kept_p

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None,
                  norm_out: Tensor | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        proj = self.projection(state, t, tuple(grad.shape), grad.device)  # (a, r)
        constants = None
        # one fp64 (4,) per step for every tensor with these hyperparameters; the Updater's t is this tensor's t
        # (it updates every tensor exactly once per step, and saves / restores both counts together)
        if clock is not None:  # the kernels read the bias corrections on the device (a captured step replays)
            constants = clock.derived(
                ("apollo", tuple(self.betas), self.scale, self.bias_correction),
                lambda t: step_constants(t, self.betas, self.scale, self.bias_correction))
        f = apollo_scaling(
            orient(grad), proj, state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"], t,
            betas=self.betas, eps=self.eps, scale=self.scale, scale_type=self.scale_type,
            bias_correction=self.bias_correction, gamma=self.gamma, scale_front=self.scale_front, backend=self.kernels,
            step_constants=constants, norm_out=norm_out,
        )
        if self.scale_type == "channel":
            f = f.reshape(channel_shape(tuple(grad.shape)))
        return Update(grad_scale=f)

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Exact, for the torch reference (the Triton kernels hold less): P (a x r) is regenerated (`randn / √r`:
        2·a·r fp32 at once); `project_with_column_norms` holds R (r x b) and reads Ĝ in row chunks of at most
        its max_chunk_elems (a bf16 chunk is upcast, then squared; an fp32 one only squared);
        `m / (v.sqrt() + eps)` holds two (r x b) temporaries, three with bias_correction = "inside". The
        update is a multiplier of the gradient: no dense direction."""
        m, n = shape
        a, b, r = min(m, n), max(m, n), self.rank
        rows = min(a, max(1, PROJECT_CHUNK // b))
        chunk = (2 if grad_dtype != torch.float32 else 1) * F32 * rows * b
        moments = (3 if self.bias_correction == "inside" else 2) * F32 * r * b
        held = F32 * a * r + F32 * r * b
        return DirectionBytes(max(2 * F32 * a * r, held + chunk, held + moments), 0, True)


def apollo_mini(**kwargs) -> Apollo:
    """APOLLO-Mini defaults: rank 1, tensor-wise scaling, scale 128 (§5)."""
    return Apollo(**{"rank": 1, "scale": 128.0, "scale_type": "tensor", **kwargs})


class APOLLO(MethodOptimizer):
    """APOLLO / APOLLO-Mini as a regular torch optimizer; 2-D params get APOLLO, others Adam.

    Example (APOLLO-Mini): APOLLO(params, lr=0.01, rank=1, scale=128, scale_type="tensor", update_proj_gap=200)
    A group with rank=None is trained by Adam (like apollo-torch's regular group).
    """

    method_cls = Apollo

    def __init__(
        self, params, lr: float = 0.01, rank: int | None = 256, scale: float = 1.0, scale_type: str = "channel",
        update_proj_gap: int = 200, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
        bias_correction: str = "outside", seed: int = 0, official_seed_chain: bool = False, scale_front: bool = False,
    ):
        defaults = dict(
            lr=lr, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=update_proj_gap, betas=betas,
            eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, seed=seed,
            official_seed_chain=official_seed_chain, scale_front=scale_front,
        )
        super().__init__(params, defaults)
