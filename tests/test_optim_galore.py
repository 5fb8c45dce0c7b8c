"""GaLore-Adam (docs/algorithms.md §7): parity with galore-torch, projection properties, refresh schedule."""

import functools

import pytest
import torch
from conftest import closed_loop_grad
from torch import nn

from qtrain.optim import GaLore, GaLoreMethod
from qtrain.optim.projection import orient

SHAPES = [(12, 20), (20, 12), (16, 16)]  # direct branch, transposed branch, square (transposed, §0)


toy_grad = functools.partial(closed_loop_grad, seed_base=1000)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_galore_torch_step_by_step(shape):
    from galore_torch import GaLoreAdamW

    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(rank=4, update_proj_gap=3)
    opt = GaLore([ours], lr=0.01, galore_scale=0.25, weight_decay=0.1, **kw)
    oracle = GaLoreAdamW([{"params": [ref], "scale": 0.25, "proj_type": "std", **kw}], lr=0.01, weight_decay=0.1)
    for t in range(1, 9):  # refreshes at t = 1, 4, 7: two refreshes after the first window
        ours.grad = toy_grad(ours.detach(), t)
        ref.grad = toy_grad(ref.detach(), t)
        opt.step()
        oracle.step()
        # same LAPACK SVD on both sides; differences are matmul/association rounding only
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=f"step {t}")


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_orthonormal_and_update_in_span(shape):
    method = GaLoreMethod(rank=5, update_proj_gap=2)
    state = method.init_state(shape, torch.device("cpu"), uid=1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for t in range(1, 6):
        d = method.direction(toy_grad(w, t), state).dense
        p = state["proj"]  # (a, r)
        torch.testing.assert_close(p.t() @ p, torch.eye(5), rtol=0, atol=1e-5)  # PᵀP = I_r
        d_hat = orient(d)  # Û (a×b)
        torch.testing.assert_close(d_hat - p @ (p.t() @ d_hat), torch.zeros_like(d_hat), rtol=0, atol=1e-6)
        w = w - 0.01 * d


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_svd_convention_of_the_unoriented_gradient(shape):
    """P = U[:, :r] of svd(G) when m < n, Vh[:r]ᵀ when m >= n: signs included (§0)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    method = GaLoreMethod(rank=3)
    state = method.init_state(shape, torch.device("cpu"), uid=1)
    method.direction(g, state)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    expected = u[:, :3] if shape[0] < shape[1] else vh[:3].t()
    assert torch.equal(state["proj"], expected)


def test_refresh_only_at_window_starts():
    gap = 3
    method = GaLoreMethod(rank=2, update_proj_gap=gap)
    state = method.init_state((8, 10), torch.device("cpu"), uid=1)
    w = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    changed = []
    for t in range(1, 12):
        before = state["proj"].clone()
        method.direction(toy_grad(w, t), state)
        changed.append(not torch.equal(before, state["proj"]))
    assert [t for t, c in enumerate(changed, start=1) if c] == [1, gap + 1, 2 * gap + 1, 3 * gap + 1]


@pytest.mark.parametrize(
    "kwargs, key",
    [({"rank": 11}, "rank"), ({"rank": 0}, "rank"), ({"update_proj_gap": 0}, "update_proj_gap"),
     ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"galore_scale": 0.0}, "galore_scale"), ({"eps": -1.0}, "eps")],
)
def test_validate_names_the_hyperparameter(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GaLoreMethod(**{"rank": 4, **kwargs}).validate((10, 20))
