"""Group-wise int8 storage and stochastic rounding (docs/algorithms.md §12)."""

import pytest
import torch

from qtrain.quant.groupwise import dequantize_groupwise, quantize_groupwise
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.linear import Int8Linear
from qtrain.quant.stochastic_round import quantize_groupwise_sr, stochastic_round


def test_nearest_roundtrip_error_within_half_step():
    w = torch.randn(48, 80) * 0.02  # 48*80 = 3840 = 30 groups of 128, groups straddle rows (80 % 128 != 0)
    codes, scale, offset = quantize_groupwise(w, 128)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and scale.shape == (30,)
    err = (dequantize_groupwise(codes, scale, offset, 128) - w).reshape(30, 128).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5))
    # the group min and max are represented exactly (float offset: codes 0 and 255)
    g = w.reshape(30, 128)
    deq = dequantize_groupwise(codes, scale, offset, 128).reshape(30, 128)
    torch.testing.assert_close(deq.min(1).values, g.min(1).values, rtol=0, atol=1e-9)
    torch.testing.assert_close(deq.max(1).values, g.max(1).values, rtol=0, atol=1e-8)


def test_all_positive_group_is_not_clipped():
    # The official integer zero point clamps z to 0 for an all-positive group and clips it (§12).
    w = torch.linspace(5.0, 6.0, 128)[None, :]
    codes, scale, offset = quantize_groupwise(w, 128)
    deq = dequantize_groupwise(codes, scale, offset, 128)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-6


def test_bytes_of_a_quantized_weight():
    layer = Int8Linear(in_features=256, out_features=96, group_size=128)
    numel = 256 * 96
    assert layer.codes.nbytes == numel  # one byte per weight
    assert layer.scale.nbytes + layer.offset.nbytes == 2 * (numel // 128) * 4  # fp32 scale + offset per group
    assert sum(b.nbytes for b in layer.buffers()) == numel + numel // 128 * 8
    assert list(layer.parameters()) == []  # no float master copy
    half = Int8Linear(256, 96, 128, meta_dtype=torch.bfloat16)
    assert sum(b.nbytes for b in half.buffers()) == numel + numel // 128 * 4


def test_size_not_multiple_of_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(3, 50\).*multiple of the group size.*group_size"):
        quantize_groupwise(torch.randn(3, 50), 128)


def test_bf16_metadata_never_clips():
    w = torch.randn(64, 128) * 3 + 1
    codes, scale, offset = quantize_groupwise(w, 128, meta_dtype=torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    v = (w.reshape(64, 128) - offset.float()[:, None]) / scale.float()[:, None]
    assert v.min() >= 0 and v.max() <= 255  # offset rounded down, scale up: the range still fits
    err = (dequantize_groupwise(codes, scale, offset, 128) - w).reshape(64, 128).abs()
    assert torch.all(err <= scale.float()[:, None] / 2 * (1 + 1e-3))


def test_sr_returns_floor_or_ceil_and_keeps_grid_values():
    v = torch.rand(10000, dtype=torch.float32) * 255
    out = stochastic_round(v, torch.rand(10000))
    assert torch.all((out == torch.floor(v)) | (out == torch.ceil(v)))
    grid = torch.randint(0, 256, (10000,)).float()
    assert torch.equal(stochastic_round(grid, torch.rand(10000)), grid)


def test_sr_is_unbiased():
    # Δ, offset fixed; N = 10^4 draws per value: |mean - w| < 4·(Δ/2)/√N (§12), accumulated in fp64.
    gen = torch.Generator().manual_seed(1)
    delta, lo = 0.01, -1.0
    w = lo + delta * (torch.rand(64, generator=gen) * 254 + 0.5)  # strictly inside the grid
    v = (w - lo) / delta
    N = 10_000
    draws = stochastic_round(v.expand(N, 64), torch.rand(N, 64, generator=gen))
    mean = (draws.double() * delta + lo).mean(0)
    bound = 4 * (delta / 2) / N**0.5
    assert torch.all((mean - w.double()).abs() < bound), (mean - w.double()).abs().max()


def test_sr_quantize_same_generator_seed_reproduces():
    w = torch.randn(8, 256)
    a = quantize_groupwise_sr(w, 128, torch.Generator().manual_seed(3))
    b = quantize_groupwise_sr(w, 128, torch.Generator().manual_seed(3))
    c = quantize_groupwise_sr(w, 128, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _interior_update(rounding_generator):
    """Apply an update of 0.1Δ to every element away from its group's min and max (ranges stay fixed)."""
    torch.manual_seed(0)
    G, g = 400, 128
    codes, scale, offset = quantize_groupwise(torch.randn(G, g), g)
    before = dequantize_groupwise(codes, scale, offset, g)
    interior = (codes > 0) & (codes < 250)  # +0.1Δ keeps these strictly inside [min, max]
    step = scale[:, None] * 0.1 * interior  # W <- W - lr * grad with lr = 1, grad = -0.1Δ
    int8_scaled_update_(codes, scale, offset, g, -step, torch.ones(()), 1.0, 0.0, rounding_generator)
    after = dequantize_groupwise(codes, scale, offset, g)
    moved = ((after - before)[interior] / scale[:, None].expand(G, g)[interior]).double()
    return moved  # per-element move in units of Δ


def test_small_update_moves_mean_under_sr_not_under_nearest():
    moved_sr = _interior_update(torch.Generator().manual_seed(0))
    # each element moves +1 step with p = 0.1: mean 0.1, std of the mean sqrt(0.09/N) ≈ 0.0006 (N ≈ 50k)
    assert abs(moved_sr.mean().item() - 0.1) < 4 * (0.09 / moved_sr.numel()) ** 0.5
    assert set(moved_sr.round().unique().tolist()) <= {0.0, 1.0}
    moved_nearest = _interior_update(None)
    assert moved_nearest.abs().max().item() < 1e-3  # every code unchanged: the update is lost


def test_sr_to_bf16_is_unbiased_and_picks_a_neighbour():
    from qtrain.quant.stochastic_round import stochastic_round_to_bf16

    x = torch.randn(64) * 0.02
    N = 20_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_round_to_bf16(x, gen) for _ in range(N)]).float()  # (N, 64)
    down = x.to(torch.bfloat16).float()
    lo = torch.where(down <= x, down, torch.nextafter(down.bfloat16(), torch.tensor(-1.0, dtype=torch.bfloat16)).float())
    hi = torch.nextafter(lo.bfloat16(), torch.tensor(1.0, dtype=torch.bfloat16)).float()
    assert torch.all((draws == lo) | (draws == hi))  # only the two bf16 neighbours of x
    ulp = hi - lo
    err = (draws.double().mean(0) - x.double()).abs()
    assert torch.all(err < 4 * (ulp.double() / 2) / N**0.5), (err / ulp).max()  # E[SR(x)] = x


def test_chunked_float_apply_equals_one_shot():
    from qtrain.optim.base import Update, apply_update_

    w = torch.randn(64, 48)
    g = torch.randn(64, 48)
    s = torch.rand(64, 1)  # per-row scale, as channel-wise APOLLO for m >= n
    a, b = w.clone(), w.clone()
    apply_update_(a, Update(grad_scale=s), g, 0.1, 0.01)
    apply_update_(b, Update(grad_scale=s), g, 0.1, 0.01, max_chunk_elems=48 * 5)  # 5 rows per chunk
    assert torch.equal(a, b)
    torch.testing.assert_close(a, (w - 0.1 * s * g) * (1 - 0.1 * 0.01), rtol=2e-7, atol=1e-7)  # fp32 reassociation


def test_sr_uniform_lattice_bias_is_below_2_to_the_minus_17():
    # P(u < f) over the 2¹⁶ equally likely lattice points, counted exactly for frac values across [0, 1):
    # the bias |P(u < f) - f| < 2⁻¹⁷ that sr_uniforms' docstring states (and k·2⁻¹⁶ would exceed it).
    from qtrain.quant.stochastic_round import sr_uniforms

    lattice = (torch.arange(1 << 16, dtype=torch.float64) + 0.5) * 2.0**-16
    f = torch.cat([torch.rand(2000, dtype=torch.float64), torch.tensor([0.0, 2.0**-18, 2.0**-17, 0.5, 1 - 2**-24])])
    p_up = torch.searchsorted(lattice, f, right=False).double() * 2.0**-16  # #{u < f} / 2¹⁶
    assert ((p_up - f).abs() <= 2.0**-17).all()
    u = sr_uniforms((4096,), torch.Generator().manual_seed(0), "cpu")
    assert u.dtype == torch.float32 and torch.equal((u.double() * 2**16 - 0.5).round(), u.double() * 2**16 - 0.5)
    assert 0 < u.min() and u.max() < 1


def test_reference_update_sr_is_unbiased():
    # The torch reference of the int8 update (16-bit uniforms, v = (w - lo)·(1/Δ)): N = 10⁴ replicas of one
    # 4x64 weight take the same update, each with its own uniforms. Sampling: SR error per draw in [-Δ, Δ],
    # variance <= Δ²/4, so 4σ of the mean is 4·(Δ/2)/√N. Deterministic terms (u = 2⁻²⁴): the lattice bias
    # < 2⁻¹⁷·Δ; the fp32 reciprocal and product put v within 3u·255 codes of (w - lo)/Δ; the fp32 roundings
    # of dequantize, update and decay move W' by <= 5u·|W'|, and the target offset likewise (10u·max|W'|).
    m, n, g, N = 4, 64, 32, 10_000
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(m, n, generator=gen) * 0.05
    codes, scale, offset = quantize_groupwise(w0, g)
    grad = torch.randn(m, n, generator=gen)
    s, lr, wd = torch.tensor(0.8), 4e-4, 0.1
    big = [codes.repeat(N, 1), scale.repeat(N), offset.repeat(N)]
    int8_scaled_update_(*big, g, grad.repeat(N, 1), s, lr, wd, torch.Generator().manual_seed(11))
    G = m * n // g
    assert (big[1].reshape(N, G) == big[1][:G]).all()  # the ranges do not depend on the uniforms
    delta = big[1][:G].double().repeat_interleave(g).reshape(m, n)
    lo = big[2][:G].double().repeat_interleave(g).reshape(m, n)
    mean = big[0].reshape(N, m, n).double().mean(0) * delta + lo
    w = codes.double().reshape(-1, g) * scale.double()[:, None] + offset.double()[:, None]
    target = (w.reshape(m, n) - lr * s.double() * grad.double()) * (1 - lr * wd)
    u = 2.0**-24
    bound = 4 * (delta / 2) / N**0.5 + delta * (2.0**-17 + 3 * u * 255) + 10 * u * target.abs().max()
    err = (mean - target).abs()
    assert (err <= bound).all(), f"worst |mean - target| / bound = {(err / bound).max():.2f}"
    nearest = ((target - lo) / delta).round() * delta + lo
    assert ((nearest - target).abs() > bound).float().mean() > 0.5  # the bound is tight enough to matter



def test_projections_reading_one_input_share_its_cast(monkeypatch):
    # q/k/v under bf16 autocast read one fp32 hidden state: one cast and one saved bf16 copy instead of three,
    # and the same outputs, weight gradients and input gradient as casting in each projection
    from qtrain.quant import linear

    torch.manual_seed(0)
    layers = [Int8Linear.from_float(torch.randn(32, 64) * 0.1, 32) for _ in range(3)]
    x0 = torch.randn(2, 5, 64)

    def run():
        x = x0.clone().requires_grad_()
        h = x * 1.0  # a non-leaf fp32 hidden state, as the RMSNorm output
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            ys = [layer(h) for layer in layers]
        sum((y.float() ** 2).sum() for y in ys).backward()
        copies = sum(t.dtype == torch.bfloat16 and t.shape == x0.shape for t in saved.values())
        return [*ys, x.grad, *(layer.weight_grad for layer in layers)], copies

    shared, shared_copies = run()
    for layer in layers:
        layer.weight_grad = None
    monkeypatch.setattr(linear, "shared_cast", lambda x, dtype: x.to(dtype))  # a cast in every projection
    own, own_copies = run()
    assert (shared_copies, own_copies) == (1, 3)
    for a, b in zip(shared, own, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    monkeypatch.undo()

    h = torch.randn(4, 64)
    first = linear.shared_cast(h, torch.bfloat16)
    assert linear.shared_cast(h, torch.bfloat16) is first and torch.equal(first, h.to(torch.bfloat16))
    h.mul_(2)  # written in place: a new version is cast again
    again = linear.shared_cast(h, torch.bfloat16)
    assert again is not first and torch.equal(again, h.to(torch.bfloat16))
    assert linear.shared_cast(first, torch.bfloat16) is first  # already in the dtype: no cast
