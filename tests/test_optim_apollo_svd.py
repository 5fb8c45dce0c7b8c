"""APOLLO-SVD (docs/algorithms.md §6): SVD projection, full-rank reduction at t = 1, parity with apollo-torch proj="svd"."""

import functools

import pytest
import torch
from conftest import closed_loop_grad
from torch import nn

from qtrain.optim import APOLLOSVD, ApolloSVDMethod, apollo_scaling
from qtrain.optim.projection import channel_shape, orient

SHAPES = [(12, 20), (20, 12), (16, 16)]


toy_grad = functools.partial(closed_loop_grad, seed_base=3000)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_matches_apollo_torch_svd_projector(shape, scale_type):
    from apollo_torch import APOLLOAdamW

    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(rank=4, update_proj_gap=3, scale=2.0, scale_type=scale_type)
    opt = APOLLOSVD([ours], lr=0.01, **kw)
    oracle = APOLLOAdamW([{"params": [ref], "proj": "svd", "proj_type": "std", **kw}], lr=0.01)
    for t in range(1, 9):  # refreshes at t = 1, 4, 7
        ours.grad = toy_grad(ours.detach(), t)
        ref.grad = toy_grad(ref.detach(), t)
        opt.step()
        oracle.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6, msg=f"step {t}")


@pytest.mark.parametrize("shape", SHAPES)
def test_projection_is_orthonormal_and_refreshes_at_window_starts(shape):
    method = ApolloSVDMethod(rank=3, update_proj_gap=2)
    state = method.init_state(shape, torch.device("cpu"), 1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    changed = []
    for t in range(1, 7):
        before = state["proj"].clone()
        method.direction(toy_grad(w, t), state)
        changed.append(not torch.equal(before, state["proj"]))
        p = state["proj"]
        torch.testing.assert_close(p.t() @ p, torch.eye(3), rtol=0, atol=1e-5)  # PᵀP = I_r
    assert [t for t, c in enumerate(changed, 1) if c] == [1, 3, 5]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_at_step_one_equals_the_structured_factors(shape):
    """r = a: P is a rotation of the short side, so at t = 1 the channel factors equal those of P = I_a
    (§6; from t = 2 on they differ because Adam normalises elementwise in the rotated basis).
    At t = 1, N = (1−β1)R ⊘ (√(1−β2)|R| + ε) = const·sign(R) only up to ε: SVD coordinates of the smallest
    singular directions are ~1e-3, where ε = 1e-6 shifts N by ~1%, so the check runs at ε = 1e-12."""
    a, b = min(shape), max(shape)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    method = ApolloSVDMethod(rank=a, eps=1e-12)
    f = method.direction(g, method.init_state(shape, torch.device("cpu"), 1)).grad_scale
    zeros = torch.zeros(a, b)
    full = apollo_scaling(orient(g), torch.eye(a), zeros.clone(), zeros.clone(), torch.zeros(()), 1,
                          betas=(0.9, 0.999), eps=1e-12, scale=1.0, scale_type="channel", bias_correction="outside")
    torch.testing.assert_close(f, full.reshape(channel_shape(shape)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kwargs, key", [({"scale_type": "row"}, "scale_type"), ({"scale": 0.0}, "scale"),
                                         ({"bias_correction": "x"}, "bias_correction"), ({"rank": 11}, "rank")])
def test_validate_names_the_hyperparameter(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ApolloSVDMethod(**{"rank": 4, **kwargs}).validate((10, 20))
