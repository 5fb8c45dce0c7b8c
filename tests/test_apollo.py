"""APOLLO / APOLLO-Mini (docs/algorithms.md §3-5) against the apollo-torch package and the closed forms given there."""

import math

import pytest
import torch
from apollo_torch import APOLLOAdamW  # test-only oracle

from qtrain.optim import APOLLO, Apollo, apollo_mini
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.projection import orient, random_projection


def _oracle(p, rank, scale, scale_type, gap, lr, scale_front=False):
    group = dict(params=[p], rank=rank, proj="random", scale_type=scale_type, scale=scale,
                 update_proj_gap=gap, proj_type="std")
    return APOLLOAdamW([group], lr=lr, weight_decay=0.0, scale_front=scale_front)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (24, 24)])
@pytest.mark.parametrize("scale_type,rank,scale", [("channel", 4, 1.0), ("tensor", 1, 128.0)])
def test_matches_apollo_torch_over_refreshes(shape, scale_type, rank, scale):
    # 9 steps with T = 3: three projection windows (refresh at t = 1, 4, 7). fp32 weights.
    # The oracle stores P and chains seeds from the 1-based parameter position; official_seed_chain
    # reproduces that. Tolerance: fp32 reassociation only (we compute ‖X‖ from column norms).
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    p_ref, p_ours = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = _oracle(p_ref, rank, scale, scale_type, 3, lr=0.01)
    ours = APOLLO([p_ours], lr=0.01, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=3,
                  official_seed_chain=True)
    for step in range(9):
        g = torch.randn(shape) * (1 + step)  # growing gradients exercise the norm-growth limiter
        p_ref.grad, p_ours.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        torch.testing.assert_close(p_ours.data, p_ref.data, rtol=1e-5, atol=1e-6, msg=f"step {step + 1}")
    assert not torch.equal(p_ours.data, w0)


@pytest.mark.parametrize("scale_type,rank,scale", [("channel", 4, 2.0), ("tensor", 1, 128.0)])
def test_scale_front_matches_apollo_torch_where_the_limiter_guard_decides(scale_type, rank, scale):
    # The limiter is homogeneous, so α before or after it only matters through its 1e-8 guard: when φ = 0. An
    # all-zero gradient at step 1 stores φ = 0; from step 2 NL cuts every update to a norm of γ(φ + 1e-8), a few
    # 1e-8, times α without scale_front and not with it. Weights start at 0, so fp32 keeps these tiny steps.
    shape = (12, 40)
    torch.manual_seed(0)
    runs = {}
    for front in (False, True):
        p_ref, p_ours = torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(torch.zeros(shape))
        ref = _oracle(p_ref, rank, scale, scale_type, 3, lr=0.01, scale_front=front)
        ours = APOLLO([p_ours], lr=0.01, rank=rank, scale=scale, scale_type=scale_type, update_proj_gap=3,
                      official_seed_chain=True, scale_front=front)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            g = torch.zeros(shape) if step == 0 else torch.randn(shape, generator=gen)
            before_ref, before_ours = p_ref.detach().clone(), p_ours.detach().clone()
            p_ref.grad, p_ours.grad = g.clone(), g.clone()
            ref.step()
            ours.step()
            # the steps themselves (not the weights): fp32 reassociation only, as in the test above
            torch.testing.assert_close(p_ours.data - before_ours, p_ref.data - before_ref, rtol=1e-5, atol=0,
                                       msg=f"scale_front={front}, step {step + 1}")
        runs[front] = p_ours.detach().norm().item()
    # the option does something here: without scale_front the limited steps are α = √scale times larger
    assert runs[False] / runs[True] == pytest.approx(math.sqrt(scale), rel=1e-4)
    assert runs[True] > 0


@pytest.mark.parametrize("shape", [(128, 768), (1536, 576)])  # a = min(m, n) = 128 and 576 (SmolLM2's width)
def test_apollo_mini_step_is_sqrt_scale_over_a_times_adams(shape):
    """The LR advice of recipes/finetune-8b.toml, derived (docs/algorithms.md §5) and measured here.

    APOLLO-Mini's step is lr·√scale·s·G with s = ‖N‖/‖R‖, R = PᵀĜ (1×b), N = Adam's M/√V of R. For gradients of
    i.i.d. entries, N has the RMS of Adam's own M/√V (the same statistics, b elements instead of a·b), so
    ‖N‖ = √b·rms; and E[R_j²] = ‖P‖²·‖Ĝ_j‖²/a, so ‖R‖ = ‖P‖·‖G‖/√a. The step's RMS over Adam's is then
    √scale·‖N‖·‖G‖/(‖R‖·√(ab)·rms) = √scale/‖P‖ ≈ √(scale/a), as P has a N(0, 1) entries (‖P‖² ~ χ²_a).
    At the same lr: 1.0 at a = 128, 0.47 at a = 576, 0.18 at Llama-3-8B's 4096 (0.35 for its 1024-row k/v).
    """
    torch.manual_seed(0)
    mini = apollo_mini(bias_correction="inside", eps=1e-8)  # finetune-8b's settings
    state = mini.init_state(shape, "cpu", uid=3)
    norm_p = mini.projection(state, 1, shape, "cpu").norm().item()  # P of the first window (all 20 steps)
    adam_w = torch.nn.Parameter(torch.zeros(shape))
    adam = torch.optim.Adam([adam_w], lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    ratios = []
    for _ in range(20):
        g = torch.randn(shape)
        step = mini.direction(g, state).grad_scale * g  # the step at lr = 1 (mode inside: no κ_t)
        before = adam_w.detach().clone()
        adam_w.grad = g.clone()
        adam.step()
        ratios.append((step.square().mean().sqrt() / (adam_w.detach() - before).square().mean().sqrt()).item())
    a = min(shape)
    measured = sum(ratios) / len(ratios)
    # Tolerances: one step's ratio scatters by ~3 % (‖R‖ sums b = 576-1536 squared projections: √(2/b)), the
    # mean of 20 by < 1 %; the limiter trims upward scatter above 1 %: 4 % around √scale/‖P‖. Against the
    # formula without P, add the spread of ‖P‖/√a, √(1/(2a)) (3 % at a = 576), three times.
    assert measured == pytest.approx(math.sqrt(128) / norm_p, rel=0.04)
    assert measured == pytest.approx(math.sqrt(128 / a), rel=0.04 + 3 * math.sqrt(1 / (2 * a)))


def test_seeded_projection_is_regenerated_bitwise_and_differs_across_windows_and_tensors():
    m = Apollo(rank=4, update_proj_gap=3, seed=7)
    st = m.init_state((16, 32), "cpu", uid=11)
    seeds = [m.projection_seed(st, t) for t in range(1, 8)]
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3]  # P changes exactly at t = 1, T+1, 2T+1
    assert seeds[3] == seeds[4] == seeds[5] != seeds[6]
    p1 = random_projection((16, 32), 4, seeds[0], torch.device("cpu"))
    assert torch.equal(p1, random_projection((16, 32), 4, seeds[0], torch.device("cpu")))
    other = m.init_state((16, 32), "cpu", uid=12)
    assert m.projection_seed(other, 1) != seeds[0]


def test_projection_preserves_norm_in_expectation():
    # E‖Pᵀx‖² = ‖x‖² for entries N(0, 1/r): mean over 1000 seeds within 3·√(2/r)/√1000 of 1 (§3).
    r, a = 8, 64
    x = torch.randn(a)
    ratios = torch.stack([
        (random_projection((a, 2 * a), r, seed, torch.device("cpu")).t() @ x).square().sum() / x.square().sum()
        for seed in range(1000)
    ])
    assert abs(ratios.double().mean().item() - 1) < 3 * math.sqrt(2 / r) / math.sqrt(1000)


def _first_step(method, g):
    st = method.init_state(tuple(g.shape), "cpu", uid=1)
    upd = method.direction(g, st)
    proj = random_projection(tuple(g.shape), method.rank, method.projection_seed(dict(st, step=0), 1), torch.device("cpu"))
    return upd, st, proj


def test_step1_closed_form_channel_inside():
    # Mode inside, ε -> 0: N = sign(R), so s_j = √r / ‖R[:, j]‖ (§4 checks); NL is off at t = 1.
    g = torch.randn(12, 40)
    method = Apollo(rank=4, scale=1.0, bias_correction="inside", eps=0.0)
    upd, _, proj = _first_step(method, g)
    r = proj.t() @ orient(g)  # (r, b)
    expected = math.sqrt(4) / (r.norm(dim=0) + 1e-8)
    torch.testing.assert_close(upd.grad_scale.reshape(-1), expected, rtol=1e-5, atol=0)


def test_apollo_mini_step1_and_parallel_to_gradient():
    g = torch.randn(40, 12)  # m >= n: Ĝ = Gᵀ, b = 40
    method = apollo_mini(bias_correction="inside", eps=0.0)
    upd, st, proj = _first_step(method, g)
    r = proj.t() @ orient(g)  # (1, 40)
    expected = math.sqrt(40) / r.norm() * math.sqrt(128)  # s = √b/‖R‖, times α = √128
    torch.testing.assert_close(upd.grad_scale, expected, rtol=1e-5, atol=0)
    d = upd.full(g)
    assert torch.nn.functional.cosine_similarity(d.flatten(), g.flatten(), dim=0) > 1 - 1e-6
    # state is O(b): M, V of shape (1, b) plus the limiter norm, independent of m·n
    assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (1, 40) and st["limiter_norm"].numel() == 1


def test_outside_mode_matches_inside_at_step1_up_to_eps():
    g = torch.randn(12, 40)
    inside, _, _ = _first_step(Apollo(rank=4, bias_correction="inside", eps=1e-8), g)
    outside, _, _ = _first_step(Apollo(rank=4, bias_correction="outside", eps=1e-6), g)
    torch.testing.assert_close(outside.grad_scale, inside.grad_scale, rtol=2e-3, atol=0)


def test_gradient_scale_invariance():
    # Multiplying every gradient of the history by c leaves the update unchanged when ε is negligible.
    torch.manual_seed(1)
    gs = [torch.randn(12, 40) for _ in range(4)]
    updates = []
    for c in (1.0, 1000.0):
        m = Apollo(rank=4, bias_correction="inside", eps=1e-12)
        st = m.init_state((12, 40), "cpu", uid=3)
        updates.append([m.direction(g * c, st).full(g * c) for g in gs])
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_norm_growth_limiter_cuts_a_spike():
    phi = torch.tensor(2.0)
    eta, new_phi = norm_growth_factor(torch.tensor(200.0), phi, first=False)
    torch.testing.assert_close(new_phi, torch.tensor(1.01 * (2.0 + 1e-8)))  # 100x spike -> 1.01x
    eta, same = norm_growth_factor(torch.tensor(1.5), phi, first=False)
    assert eta.item() == 1.0 and same.item() == 1.5  # a norm is never increased
    n = torch.tensor(1.0)
    steps = 0
    while n.item() < 100.0:  # the stored norm is the cut one: 463 steps to grow 100x (§2)
        _, n = norm_growth_factor(torch.tensor(100.0), n, first=False)
        steps += 1
    assert steps == math.ceil(math.log(100) / math.log(1.01))


def test_apollo_state_floats():
    st = Apollo(rank=8).init_state((64, 256), "cpu", uid=1)
    floats = sum(v.numel() for v in st.values() if torch.is_tensor(v))
    assert floats == 2 * 8 * 256 + 1  # 2rb + 1 with P seeded (§4)


def test_validation_names_the_hyperparameter():
    with pytest.raises(ValueError, match=r"rank = 100 must be in \[1, 16\]"):
        Apollo(rank=100).validate((16, 32))
    with pytest.raises(ValueError, match="scale_type"):
        Apollo(rank=4, scale_type="row").validate((16, 32))


def test_bf16_gradient_is_projected_without_a_full_fp32_copy_and_same_result():
    from qtrain.optim.apollo import project_with_column_norms

    g = torch.randn(300, 40).bfloat16()
    proj = torch.randn(300, 4)
    r, col_sq = project_with_column_norms(proj, g, max_chunk_elems=40 * 7)  # 7 rows at a time
    torch.testing.assert_close(r, proj.t() @ g.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col_sq, g.float().square().sum(0), rtol=1e-5, atol=1e-6)
    m32, m16 = Apollo(rank=4), Apollo(rank=4)
    s32, s16 = m32.init_state((40, 300), "cpu", 1), m16.init_state((40, 300), "cpu", 1)
    gw = g.t()  # a (40, 300) weight's gradient in bf16
    torch.testing.assert_close(m16.direction(gw, s16).grad_scale, m32.direction(gw.float(), s32).grad_scale,
                               rtol=1e-5, atol=0)
