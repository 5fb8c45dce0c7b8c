"""APOLLO / APOLLO-Mini statistics of a gradient sharded by rows across ranks (FSDP2: qtrain.parallel.fsdp).

The update must equal the unsharded one, and APOLLO's statistics live on the columns of the oriented gradient
Ĝ. Every rank owns a block of Ĝ's columns: its own rows of G when Ĝ = Gᵀ (m >= n), or a column block fetched
with one all-to-all of its gradient shard when Ĝ = G (m < n). R = PᵀĜ, the column norms and the moments of
those columns are computed locally with the unsharded arithmetic; N, R and the column norms are all-gathered,
and every norm (APOLLO-Mini's ‖N‖, ‖R‖, ‖Ĝ‖; APOLLO's per-column ratios and ‖Ĝ·Diag(s)‖) is taken of those
unsharded tensors by the same functions the unsharded update calls (apollo.update_moments_, scale_factor).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from qtrain.optim.apollo import project_with_column_norms, scale_factor, update_moments_
from qtrain.optim.projection import random_projection


def _gather_columns(pieces: list[Tensor], group=None) -> list[Tensor]:
    """Every rank's pieces (each (rows, k) or (k,)) concatenated along their last dim in rank order, with one
    all-gather for all of them: the unsharded tensors, bit for bit."""
    flat = torch.cat([p.reshape(-1) for p in pieces])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    out, at = [], 0
    for p in pieces:
        n = p.numel()
        out.append(torch.cat([g[at:at + n].view(p.shape) for g in gathered], dim=-1))
        at += n
    return out


def _column_block(grad: Tensor, shape: tuple[int, int], world: int, group=None) -> Tensor:
    """This rank's block of columns of the oriented gradient Ĝ (a × b/world), from its rows of G.

    Ĝ = Gᵀ (m >= n): the local rows of G are columns of Ĝ already. Ĝ = G (m < n): one all-to-all swaps
    row blocks for column blocks (each rank sends 1/world of its shard to each other rank).
    """
    m, n = shape
    if m >= n:
        return grad.t()  # (n, m_local), a view: the strides Ĝ = Gᵀ has in the unsharded update
    rows, k = grad.shape[0], n // world
    send = grad.reshape(rows, world, k).transpose(0, 1).contiguous()  # (world, rows, k): block j goes to rank j
    recv = torch.empty_like(send)  # from rank j: its rows, my columns
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(m, k)


def sharded_apollo_scale(method, grad: Tensor, state: dict, shape: tuple[int, int], rank: int, world: int,
                         group=None) -> Tensor:
    """Apollo.direction for one rank's rows of G (m × n): the grad_scale of those rows, equal to the unsharded
    direction's. state holds this rank's column block of the moments (r × b/world).

    apollo.scaling_chain's two halves: the moments of the column block are updated locally (elementwise), then
    N, R and the column norms are all-gathered (r × b, r × b, b floats) and every norm is taken of the
    unsharded tensors, so it has the unsharded bits.
    """
    state["step"] = t = state["step"] + 1
    m, n = shape
    proj = random_projection(shape, method.rank, method.projection_seed(state, t), grad.device)  # (a, r), full
    g_hat = _column_block(grad, shape, world, group)  # (a, b_local)
    b, b_local = max(m, n), g_hat.shape[1]
    r, col_sq = project_with_column_norms(proj, g_hat, width=b, first_column=rank * b_local)
    n_local, step_factor = update_moments_(r, state["exp_avg"], state["exp_avg_sq"], t, betas=method.betas,
                                           eps=method.eps, bias_correction=method.bias_correction)
    nrm, r, col_sq = _gather_columns([n_local, r, col_sq], group)  # (r, b), (r, b), (b,): the unsharded tensors
    f = scale_factor(nrm, r, col_sq, state["limiter_norm"], t, step_factor, scale=method.scale,
                     scale_type=method.scale_type, gamma=method.gamma, scale_front=method.scale_front)
    if method.scale_type != "channel":
        return f
    if m < n:
        return f.reshape(1, n)  # every row takes all n column factors
    return f[rank * b_local : (rank + 1) * b_local].reshape(b_local, 1)  # this rank's rows
