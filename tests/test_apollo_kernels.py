"""Fused APOLLO / APOLLO-Mini statistics (qtrain/optim/apollo_kernels.py) against their torch references.

Kernel cases run on "cpu" (Triton's interpreter) and "cuda" (compiled; skipped without a GPU); the oracle
is always the torch reference run on CPU copies of the same inputs.

Bounds (u = 2⁻²⁴, first order in u; ×1.01 covers the second-order terms, all below 1 % here):
  - a dot product of length k summed in any order, with or without FMA, is within γ_k·Σ|xᵢyᵢ| of the exact
    value (Higham §3.1, γ_k = ku/(1-ku)), so two orders differ by at most 2γ_k·Σ|xᵢyᵢ|. That bounds R = PᵀĜ
    (k = a) and the squared column norms (k = a, plus the squaring: γ_{a+1});
  - a 2-norm of k identical fp32 values: each side is ‖x‖(1+η), |η| <= ku/2 + u (sum of k non-negative
    squares: γ_k relative; sqrt halves it and rounds once), so two orders differ by e(k) = (k + 2)u relative;
  - the chain then adds one rounding per operation on each side (2u per op), see chain_bounds.
"""

import math
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` of the process
triton = pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

from conftest import compile_for_sm90, interpreter_process_test

from qtrain.optim import apollo_kernels
from qtrain.optim.apollo import (
    Apollo,
    apollo_mini,
    apollo_scaling,
    project_with_column_norms,
    scaling_chain,
)
from qtrain.optim.projection import orient, random_projection
from qtrain.quant import dispatch, triton_kernels

U = 2.0**-24
MODES = [("channel", 4), ("tensor", 1), ("channel", 20)]  # APOLLO r=4, APOLLO-Mini, r=20 (R padded to 32 rows)
SHAPES = [(12, 40), (150, 36)]  # Ĝ = G (a=12, b=40), and Ĝ = Gᵀ, a strided view (a=36 > BLOCK_A, b=150: 2 programs)


test_cpu_cases_in_an_interpreter_process = interpreter_process_test(__file__)


def gamma(k):
    return k * U / (1 - k * U)


def method(scale_type, rank, bias_correction="outside", **kw):
    base = apollo_mini if scale_type == "tensor" else Apollo
    return base(rank=rank, scale_type=scale_type, bias_correction=bias_correction, update_proj_gap=2, **kw)


def grads(shape, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(shape, generator=gen) * (1 + t)).to(dtype) for t in range(steps)]  # growing: NL acts


# ---------------------------------------------------------------------------------------------------
# R = PᵀĜ and column norms, across projection refreshes


@pytest.mark.parametrize("splits", [None, 3], ids=["splits_auto", "3_splits"])
@pytest.mark.parametrize("official", [False, True], ids=["qtrain_seeds", "official_chain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale_type,rank", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_within_the_reduction_order_bound(device, shape, scale_type, rank, dtype, official, splits):
    apollo = method(scale_type, rank, official_seed_chain=official)
    state = apollo.init_state(shape, "cpu", uid=3)
    seeds = []
    for t, g in enumerate(grads(shape, 4, dtype), start=1):  # gap 2: P refreshed at t = 1 and t = 3
        seeds.append(apollo.projection_seed(state, t))
        proj = random_projection(shape, rank, seeds[-1], torch.device("cpu"))
        r_ref, c_ref = project_with_column_norms(proj, orient(g))
        r, c = apollo_kernels.project_with_column_norms_triton(proj.to(device), orient(g.to(device)), splits)
        g64, p64 = orient(g).double(), proj.double()
        a = g64.shape[0]
        # the rows in S splits (S <= 2 when a = 36: whole tiles of BLOCK_A rows), summed in split order
        assert r.shape[1:] == r_ref.shape and c.shape[1:] == c_ref.shape and r.shape[0] == c.shape[0] <= 3
        S = r.shape[0]
        r, c = r.sum(0), c.sum(0)
        r_bound = 2 * gamma(a + S) * (p64.abs().t() @ g64.abs()) * 1.01
        c_bound = 2 * gamma(a + S) * g64.square().sum(0) * 1.01
        assert ((r.cpu().double() - r_ref.double()).abs() <= r_bound).all(), f"R at step {t}"
        assert ((c.cpu().double() - c_ref.double()).abs() <= c_bound).all(), f"column norms at step {t}"
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]  # the refresh happened inside the test


# ---------------------------------------------------------------------------------------------------
# the moment / ratio / limiter chain: moments bitwise, the rest within the derived bound


def e_norm(k):
    return (k + 2) * U


def chain_bounds(scale_type, rank, b, first, front=False):
    """Relative bounds of f (per element) and φ between two evaluations of the chain on identical inputs.

    s = ‖N‖/(‖R‖+1e-8): e_s = e(k) + (e(k) + 2u) + 2u, k = r per column (channel) or r·b (tensor);
    ‖X‖: channel sqrt(Σ_j s_j²c_j): terms 2e_s + 4u, a sum of b non-negative terms + 2bu, sqrt halves, + 2u
    -> e_x = e_s + (b + 4)u; tensor s·sqrt(Σc): e_x = e_s + e(b) + 2u;
    ρ = ‖X‖/(φ+1e-8)/γ: + 4u; η = 1/max(ρ, 1) (max is monotone and 1-Lipschitz): e_η = e_x + 6u (0 at t = 1);
    f = s·(η·factor): e_s + e_η + 4u; φ' = ‖X‖·η: e_x + e_η + 2u (φ' = ‖X‖ at t = 1).
    """
    k = rank if scale_type == "channel" else rank * b
    e_s = 2 * e_norm(k) + 4 * U
    e_x = e_s + (b + 4) * U if scale_type == "channel" else e_s + e_norm(b) + 2 * U
    e_x += U if front else 0.0  # scale_front: ‖X‖·α, one more rounding
    e_eta = 0.0 if first else e_x + 6 * U
    e_f = e_s + e_eta + 4 * U
    e_phi = e_x if first else e_x + e_eta + 2 * U
    return 1.01 * e_f, 1.01 * e_phi


def assert_bitwise_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = actual.reshape(-1).view(torch.int32) != expected.reshape(-1).view(torch.int32)
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ"


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("bias_correction", ["outside", "inside"])
@pytest.mark.parametrize("scale_type,rank", MODES)
def test_chain_moments_bitwise_and_factor_within_bound(device, scale_type, rank, bias_correction, eps):
    b = 150
    apollo = method(scale_type, rank, bias_correction, eps=eps)
    hyper = dict(betas=apollo.betas, eps=eps, scale=apollo.scale, scale_type=scale_type,
                 bias_correction=bias_correction, gamma=apollo.gamma)
    state = apollo.init_state((36, b), "cpu", uid=1)
    m, v, phi = state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"]
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 6):
        r = torch.randn(rank, b, generator=gen) * (1 + t**2)  # growing: the limiter cuts from t = 2 on
        col_sq = torch.rand(b, generator=gen) * 10 * (1 + t**2)
        km, kv, kphi = (x.clone().to(device) for x in (m, v, phi))
        f = apollo_kernels.scaling_chain_triton(r.to(device), col_sq.to(device), km, kv, kphi, t, **hyper)
        f_ref = scaling_chain(r, col_sq, m, v, phi, t, **hyper)  # the oracle; its state feeds the next step
        assert_bitwise_equal(km.cpu(), m, f"m at step {t}")
        assert_bitwise_equal(kv.cpu(), v, f"v at step {t}")
        e_f, e_phi = chain_bounds(scale_type, rank, b, first=t == 1)
        assert f.shape == f_ref.shape
        rel_f = ((f.cpu().double() - f_ref.double()).abs() / f_ref.double().abs()).max().item()
        rel_phi = abs(kphi.item() - phi.item()) / phi.item()
        assert rel_f <= e_f, f"f at step {t}: relative error {rel_f:.3g} > bound {e_f:.3g}"
        assert rel_phi <= e_phi, f"phi at step {t}: relative error {rel_phi:.3g} > bound {e_phi:.3g}"
    assert phi.item() < math.sqrt(col_sq.sum().item()) * 1e6  # finite, and the chain ran to the end


@pytest.mark.parametrize("scale_type,rank", MODES)
def test_chain_adds_the_split_partial_sums_in_order(device, scale_type, rank):
    # S partial sums of R and the column norms (the projection kernel's splits): the chain adds them in split
    # order, so its moments equal, bit for bit, the reference's on the same fp32 sum taken in that order
    b, S = 150, 3
    apollo = method(scale_type, rank)
    hyper = dict(betas=apollo.betas, eps=apollo.eps, scale=apollo.scale, scale_type=scale_type,
                 bias_correction=apollo.bias_correction, gamma=apollo.gamma)
    state = apollo.init_state((36, b), "cpu", uid=1)
    m, v, phi = state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"]
    km, kv, kphi = (x.clone().to(device) for x in (m, v, phi))
    gen = torch.Generator().manual_seed(4)
    for t in range(1, 4):
        r_parts = torch.randn(S, rank, b, generator=gen) * (1 + t)
        c_parts = torch.rand(S, b, generator=gen) * 10 * (1 + t)
        r, col_sq = (r_parts[0] + r_parts[1]) + r_parts[2], (c_parts[0] + c_parts[1]) + c_parts[2]
        norm = torch.zeros((), device=device)
        f = apollo_kernels.scaling_chain_triton(r_parts.to(device), c_parts.to(device), km, kv, kphi, t,
                                                norm_out=norm, **hyper)
        f_ref = scaling_chain(r, col_sq, m, v, phi, t, **hyper)
        assert_bitwise_equal(km.cpu(), m, f"m at step {t}")
        assert_bitwise_equal(kv.cpu(), v, f"v at step {t}")
        e_f, _ = chain_bounds(scale_type, rank, b, first=t == 1)
        assert ((f.cpu().double() - f_ref.double()).abs() / f_ref.double().abs()).max().item() <= e_f
        assert abs(norm.item() - col_sq.double().sum().sqrt().item()) <= e_norm(b) * col_sq.double().sum().sqrt()


@pytest.mark.parametrize("scale_type,rank", MODES)
def test_chain_with_scale_front_within_bound(device, scale_type, rank):
    # scale_front: α before the limiter. All-zero statistics at t = 1 store φ = 0, so from t = 2 on the 1e-8
    # guard decides η, and α with it (the only case where the option changes the numbers)
    b = 150
    apollo = method(scale_type, rank, scale=128.0, scale_front=True)
    hyper = dict(betas=apollo.betas, eps=apollo.eps, scale=apollo.scale, scale_type=scale_type,
                 bias_correction=apollo.bias_correction, gamma=apollo.gamma, scale_front=True)
    state = apollo.init_state((36, b), "cpu", uid=1)
    m, v, phi = state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"]
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 5):
        scale = 0.0 if t == 1 else 1 + t**2
        r = torch.randn(rank, b, generator=gen) * scale
        col_sq = torch.rand(b, generator=gen) * 10 * scale
        km, kv, kphi = (x.clone().to(device) for x in (m, v, phi))
        f = apollo_kernels.scaling_chain_triton(r.to(device), col_sq.to(device), km, kv, kphi, t, **hyper)
        f_ref = scaling_chain(r, col_sq, m, v, phi, t, **hyper)
        if t == 1:
            assert phi.item() == kphi.item() == 0.0
            continue
        e_f, e_phi = chain_bounds(scale_type, rank, b, first=False, front=True)
        rel_f = ((f.cpu().double() - f_ref.double()).abs() / f_ref.double().abs()).max().item()
        assert rel_f <= e_f, f"f at step {t}: relative error {rel_f:.3g} > bound {e_f:.3g}"
        assert abs(kphi.item() - phi.item()) / phi.item() <= e_phi, f"phi at step {t}"
    expected = 0.0
    for _ in range(3):  # each step cut to γ(φ + 1e-8), from φ = 0
        expected = 1.01 * (expected + 1e-8)
    assert phi.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# wired in: Apollo.direction through the dispatcher


@pytest.mark.parametrize("bias_correction", ["outside", "inside"])
@pytest.mark.parametrize("scale_type,rank", MODES[:2])
@pytest.mark.parametrize("shape", SHAPES)
def test_direction_triton_tracks_torch_over_refreshes(device, shape, scale_type, rank, bias_correction):
    # An end-to-end check of the wiring, not a derived bound: the per-step differences above (<= ~1e-5
    # relative at these sizes) feed back through m, v and φ, so 6 steps get rtol 1e-4.
    ours, ref = method(scale_type, rank, bias_correction), method(scale_type, rank, bias_correction)
    ours.kernels, ref.kernels = "triton", "torch"
    s_ours, s_ref = ours.init_state(shape, device, uid=7), ref.init_state(shape, device, uid=7)
    for t, g in enumerate(grads(shape, 6, torch.bfloat16), start=1):  # refreshes at t = 1, 3, 5
        g = g.to(device)
        f = ours.direction(g, s_ours).grad_scale
        f_ref = ref.direction(g, s_ref).grad_scale
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=0, msg=f"step {t}")
    torch.testing.assert_close(s_ours["exp_avg"], s_ref["exp_avg"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s_ours["limiter_norm"], s_ref["limiter_norm"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale_type,rank", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_gradient_norm_comes_with_the_statistics(device, shape, scale_type, rank, backend):
    # norm_out (the step's grad-norm slot) receives ‖G‖ from the column norms; f and the state are untouched
    apollo = method(scale_type, rank)
    hyper = dict(betas=apollo.betas, eps=apollo.eps, scale=apollo.scale, scale_type=scale_type,
                 bias_correction=apollo.bias_correction, gamma=apollo.gamma, backend=backend)
    g = grads(shape, 1, torch.bfloat16)[0]
    g_hat = orient(g).to(device)
    a, b = g_hat.shape
    proj = random_projection((a, b), rank, 3, torch.device("cpu")).to(device)
    with_norm, without = (apollo.init_state(shape, device, uid=1) for _ in range(2))
    norm = torch.full((), -1.0, device=device)
    keys = ("exp_avg", "exp_avg_sq", "limiter_norm")
    f = apollo_scaling(g_hat, proj, *(with_norm[k] for k in keys), 1, norm_out=norm, **hyper)
    assert_bitwise_equal(f, apollo_scaling(g_hat, proj, *(without[k] for k in keys), 1, **hyper), "f")
    for k in keys:
        assert_bitwise_equal(with_norm[k], without[k], k)
    # a column's a squares, then b column sums, in some order (γ_a + γ_b relative), then a sqrt (halves it, + u)
    exact = g.double().norm().item()
    bound = 1.01 * ((gamma(a + 1) + gamma(b + 1)) / 2 + U)
    assert abs(norm.item() - exact) / exact <= bound


def test_cpu_auto_is_the_torch_reference_unchanged(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a Triton kernel ran on CPU with backend='auto'")

    monkeypatch.setattr(apollo_kernels, "project_with_column_norms_triton", fail)
    monkeypatch.setattr(apollo_kernels, "scaling_chain_triton", fail)
    g = grads((12, 40), 1, torch.bfloat16)[0]
    hyper = dict(betas=(0.9, 0.999), eps=1e-6, scale=128.0, scale_type="tensor", bias_correction="inside")
    st = [torch.zeros(1, 40), torch.zeros(1, 40), torch.zeros(())]
    st2 = [x.clone() for x in st]
    proj = random_projection((12, 40), 1, 3, torch.device("cpu"))
    f = apollo_scaling(orient(g), proj, *st, 1, **hyper)  # backend "auto"
    r, col_sq = project_with_column_norms(proj, orient(g))
    assert_bitwise_equal(f, scaling_chain(r, col_sq, *st2, 1, **hyper), "f")
    assert Apollo().kernels == "auto"


def test_dispatch_errors_name_the_fix(monkeypatch):
    g, proj = torch.randn(12, 40), torch.randn(12, 4)
    st = [torch.zeros(4, 40), torch.zeros(4, 40), torch.zeros(())]
    hyper = dict(betas=(0.9, 0.999), eps=1e-6, scale=1.0, scale_type="channel", bias_correction="outside")
    monkeypatch.setattr(triton_kernels, "interpret_mode", lambda: False)  # as in a compiled-mode process
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        apollo_scaling(g, proj, *st, 1, **hyper, backend="triton")
    with pytest.raises(ValueError, match=r"backend = 'gpu'; allowed"):
        apollo_scaling(g, proj, *st, 1, **hyper, backend="gpu")
    big = [torch.zeros(300, 40), torch.zeros(300, 40), torch.zeros(())]
    with pytest.raises(ValueError, match=r"fused APOLLO statistics cannot run in Triton: rank 300 > 256.*'torch'"):
        apollo_scaling(torch.randn(400, 40).t(), torch.randn(40, 300), *big, 1, **hyper, backend="triton")
    assert not dispatch.use_triton("auto", (g,), [], "x")  # CPU tensors: the reference


# ---------------------------------------------------------------------------------------------------
# compiled code without a GPU

AOT_SCRIPT = r"""
from qtrain.optim import apollo_kernels as ak

out = {}
for name, rank, g in [("project_mini_bf16", 1, "bf16"), ("project_r4_bf16", 4, "bf16"),
                      ("project_r16_bf16", 16, "bf16"), ("project_r256_fp32", 256, "fp32")]:
    ba, br, bb = ak._project_blocks(rank)
    out[name] = ptx(ak._project_kernel, {
        "g_ptr": f"*{g}", "p_ptr": "*fp32", "r_ptr": "*fp32", "colsq_ptr": "*fp32", "a": "i32", "b": "i32",
        "rank": "i32", "rows_per_split": "i32", "stride_ga": "i32", "stride_gb": "i32", "stride_pa": "i32",
        "stride_pr": "i32", "BLOCK_A": "constexpr", "BLOCK_R": "constexpr", "BLOCK_B": "constexpr",
        "SMALL_RANK": "constexpr"},
        {"BLOCK_A": ba, "BLOCK_R": br, "BLOCK_B": bb, "SMALL_RANK": rank <= ak.SMALL_RANK}, num_warps=4,
        enable_fp_fusion=True)
# the step's constants as host numbers, or (the capturable step) read from an fp64 device vector
for name, channel, inside, on_device in [("chain_tensor_inside", False, True, False),
                                         ("chain_channel_outside", True, False, False),
                                         ("chain_tensor_inside_device_step", False, True, True)]:
    sig = {k: "*fp32" for k in ("r_ptr", "colsq_ptr", "m_ptr", "v_ptr", "phi_ptr", "f_ptr", "norm_ptr")}
    sig.update({"rank": "i32", "b": "i32", "splits": "i32", "step_ptr": "*fp64" if on_device else "*fp32"})
    sig.update({k: "fp32" for k in ("b1", "b2", "one_minus_b1", "one_minus_b2", "eps", "c1", "c2", "gamma", "factor",
                                    "front")})
    sig.update({k: "constexpr" for k in ("BLOCK_R", "BLOCK_B", "CHANNEL", "INSIDE", "FIRST", "STEP_IS_PTR",
                                         "HAS_NORM")})
    out[name] = ptx(ak._chain_kernel, sig, {"BLOCK_R": 16, "BLOCK_B": 256, "CHANNEL": channel, "INSIDE": inside,
                                           "FIRST": False, "STEP_IS_PTR": on_device, "HAS_NORM": True}, num_warps=4)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    ptx = compile_for_sm90(AOT_SCRIPT, tmp_path)
    for name, code in ptx.items():
        assert "tf32" not in code, f"{name}: TF32 products would break the fp32 bound"
        assert "div.approx" not in code and "div.full" not in code and "sqrt.approx" not in code, name
    for name in ("chain_tensor_inside", "chain_channel_outside", "chain_tensor_inside_device_step"):
        assert "div.rn.f32" in ptx[name] and "sqrt.rn.f32" in ptx[name], name
        assert ptx[name].count("fma.rn.f32") >= 2, f"{name}: the two moment FMAs"
    # rank 1 multiplies in registers: 32 FMAs per thread and tile, not a tile padded to 16 rows of P (528)
    assert 8 * ptx["project_mini_bf16"].count("fma.rn.f32") <= ptx["project_r16_bf16"].count("fma.rn.f32")
