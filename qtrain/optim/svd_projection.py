"""SVD projections for APOLLO-SVD, GaLore and Fira: top-r (docs/algorithms.md §0, §7) and I3S sampling (§9).

All three methods store P (a×r, orthonormal columns, fp32) in their state and refresh it in place at
t = 1, T+1, 2T+1, ... (§0 "Refresh" schedules; I3S follows GaLore's convention, not [003] Alg. 2's
`t mod τ = 0`). The singular vectors come from the thin SVD of the *un-oriented* G (§0 SVD
convention): `U[:, :r]` when m < n, `Vh[:r]ᵀ` when m >= n. svd(Ĝ) would span the same subspace with
different signs, and since moments are not re-projected at a refresh the sign changes the trajectory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.core.seeding import mix_seed, seeded_generator


def svd_refresh_bytes(shape: tuple[int, int]) -> int:
    """Transients of a projection refresh (approximate): U and Vᵀ of the thin SVD of G (m x a, a x n in fp32)
    and one fp32 copy of G for the LAPACK / cuSOLVER workspace."""
    m, n = shape
    a = min(m, n)
    return torch.float32.itemsize * (m * a + a * n + m * n)


def refresh_due(step: int, gap: int) -> bool:
    """GaLore/APOLLO/Fira refresh rule: (t − 1) mod T == 0, i.e. t = 1, T+1, 2T+1, ... (§0)."""
    return (step - 1) % gap == 0


def orient_back(d_hat: Tensor, shape: tuple[int, int]) -> Tensor:
    """Undo `orient`: D̂ (a×b) -> D of the weight's shape (m×n); a view, no copy (§0)."""
    m, n = shape
    return d_hat if m < n else d_hat.t()


def singular_basis(grad: Tensor) -> tuple[Tensor, Tensor]:
    """All a singular vectors of the short side, and the singular values, by the §0 convention.

    grad: un-oriented G (m×n), any float dtype; the SVD runs in fp32.
    Returns (vecs (a×a) fp32: column i = the i-th singular vector on the short side (descending σ),
             sigma (a,) fp32, descending).
    """
    m, n = grad.shape
    u, sigma, vh = torch.linalg.svd(grad.float(), full_matrices=False)  # U (m×a), Σ (a,), Vh (a×n)
    vecs = u if m < n else vh.t()  # (a, a): U when m < n, Vhᵀ when m >= n (§0)
    return vecs, sigma


def top_r_projection(grad: Tensor, rank: int) -> Tensor:
    """P (a×r) fp32: the top-r singular vectors of G by the §0 convention (GaLore `get_orthogonal_matrix`)."""
    vecs, _ = singular_basis(grad)
    return vecs[:, :rank]


def i3s_indices(sigma: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """r distinct indices of [0, a), drawn by importance σ_i without replacement, sorted ascending (§9).

    sigma: (a,) fp32 singular values (descending). Returns int64 (r,) on sigma's device.
    """
    w = sigma / sigma.sum()  # w_i = σ_i / Σ_k σ_k (not squared)                        §9 step 1
    # multinomial without replacement fails with fewer than r positive weights: floor at 1e-12·w_max (§9)
    w = torch.maximum(w, 1e-12 * w.max()).nan_to_num(nan=1.0)  # all-zero G: σ = 0 -> uniform
    idx = torch.multinomial(w, rank, replacement=False, generator=generator)  # sequential draw  §9 step 2
    return idx.sort().values  # state row k keeps pairing with the k-th most important direction  §9 step 3


def i3s_projection(grad: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """P (a×r) fp32 = U_s[:, I] with I from `i3s_indices` ([003] Alg. 1-2; §9 step 4)."""
    vecs, sigma = singular_basis(grad)
    return vecs[:, i3s_indices(sigma, rank, generator)]


def refresh_projection_(
    proj: Tensor, grad: Tensor, *, i3s: bool, seed: int, uid: int, window: int
) -> None:
    """Overwrite the stored P (a×r, fp32) with this window's projection of G.

    I3S draws from a dedicated generator seeded with mix_seed(seed, uid, window): stateless, so a
    resumed run draws the same indices and nothing but ints needs checkpointing.
    """
    rank = proj.shape[1]
    if i3s:
        gen = seeded_generator(grad.device, mix_seed(seed, uid, window))
        proj.copy_(i3s_projection(grad, rank, gen))
    else:
        proj.copy_(top_r_projection(grad, rank))
