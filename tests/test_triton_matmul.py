"""The fused dequant-GEMM (quant/triton_matmul.py) against its references, and its wiring into Int8Linear.

Kernel cases run on "cpu" (Triton's interpreter) and "cuda" (compiled; skipped without a GPU), see conftest.
Exactness: fed an identity matrix the kernels return Ŵᵀ / Ŵ bit for bit (the dequantized tiles are the
reference's). Products: within fp32 accumulation error of an fp64 product of the same rounded operands.
"""

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` of the process
triton = pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

from conftest import (
    compile_for_sm90,
    interpreter_process_test,
    quant_cfg,
    tiny_model_cfg,
    triton_interpreted,
)

from qtrain.model.builder import build_model
from qtrain.model.loss import lm_loss
from qtrain.quant import dispatch, triton_matmul
from qtrain.quant.groupwise import dequantize_groupwise, quantize_groupwise
from qtrain.quant.linear import Int8Linear

INTERPRETED = triton_interpreted()
# (N, K, g): the per-row tiling (groups inside rows; N = 40 leaves a partial tile of rows), then the gathering
# one: groups straddling rows (40 % 32), an odd in_features (45, as the 1b recipe's 5461), a group below BLOCK_K
SHAPES = [(48, 64, 32), (40, 96, 32), (32, 64, 64), (12, 40, 32), (32, 45, 16), (24, 64, 8)]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


test_cpu_cases_in_an_interpreter_process = interpreter_process_test(__file__)


def weight(N, K, g, device, meta=torch.float32, seed=7):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    return tuple(t.to(device) for t in quantize_groupwise(w, g, meta))


def assert_within_accumulation_error(got, a, b, what):
    """got ≈ a @ b, both operands already in got.dtype: |got - exact| <= fp32 accumulation + output rounding."""
    exact = a.double() @ b.double()
    k = a.shape[1]
    accumulation = k * 2.0**-24 * (a.double().abs() @ b.double().abs())
    bound = accumulation * (1 + UNIT_ROUNDOFF[got.dtype]) + UNIT_ROUNDOFF[got.dtype] * exact.abs() + 1e-30
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: worst error / bound = {(err / bound).max():.2f}"
    return exact


# ---------------------------------------------------------------------------------------------------
# kernels against references


@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,g", SHAPES)
def test_identity_gives_the_dequantized_weight_bit_exact(device, N, K, g, dtype, meta):
    codes, scale, offset = weight(N, K, g, device, meta)
    codes = torch.randint(0, 256, (N, K), dtype=torch.uint8).to(device)  # every code value
    w_hat = dequantize_groupwise(codes, scale, offset, g, dtype)
    y = triton_matmul.int8_matmul_triton(torch.eye(K, dtype=dtype, device=device), codes, scale, offset, g)
    assert torch.equal(y, w_hat.t()), f"forward: {(y != w_hat.t()).sum()} elements differ"
    dx = triton_matmul.int8_matmul_grad_input_triton(torch.eye(N, dtype=dtype, device=device), codes, scale,
                                                     offset, g)
    assert torch.equal(dx, w_hat), f"input gradient: {(dx != w_hat).sum()} elements differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,g", SHAPES)
def test_products_match_the_reference_to_accumulation_error(device, N, K, g, dtype):
    codes, scale, offset = weight(N, K, g, device)
    M = 37  # not a multiple of any tile
    x = torch.randn(M, K).to(device, dtype)
    dy = torch.randn(M, N).to(device, dtype)
    w_hat = dequantize_groupwise(codes, scale, offset, g, dtype)

    y = triton_matmul.int8_matmul_triton(x, codes, scale, offset, g)
    exact = assert_within_accumulation_error(y, x, w_hat.t(), "forward")
    ref = triton_matmul.int8_matmul_reference(x, codes, scale, offset, g)
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape == (M, N)
    assert_within_accumulation_error(ref, x, w_hat.t(), "the reference itself")  # the bound is not loose...
    assert (y.double() - exact).abs().max() < 0.05 * exact.abs().max()  # ...and not vacuous

    dx = triton_matmul.int8_matmul_grad_input_triton(dy, codes, scale, offset, g)
    assert_within_accumulation_error(dx, dy, w_hat, "input gradient")
    assert dx.shape == triton_matmul.int8_matmul_grad_input_reference(dy, codes, scale, offset, g).shape == (M, K)


def test_a_strided_activation_is_read_in_place(device):
    codes, scale, offset = weight(48, 64, 32, device)
    wide = torch.randn(20, 128).to(device)
    x = wide[:, :64]  # row stride 128
    assert not x.is_contiguous()
    assert torch.equal(triton_matmul.int8_matmul_triton(x, codes, scale, offset, 32),
                       triton_matmul.int8_matmul_triton(x.contiguous(), codes, scale, offset, 32))


def test_both_tilings_are_exercised():
    assert [triton_matmul.aligned(K, g, interpreted=True) for _, K, g in SHAPES] == [True] * 3 + [False] * 3
    assert triton_matmul.aligned(4096, 128, interpreted=False) and not triton_matmul.aligned(5461, 128, False)


def test_unsupported_layouts_are_refused_with_the_fix():
    codes, scale, offset = quantize_groupwise(torch.randn(12, 40), 24)
    with pytest.raises(ValueError, match=r"group size 24 must be a power of two dividing the weight's 480 elements.*"
                                         r'\[quant\] matmul = "dequantize"'):
        triton_matmul.int8_matmul_triton(torch.randn(3, 40), codes, scale, offset, 24)
    codes, scale, offset = quantize_groupwise(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match=r"must be \(M, 64\)"):
        triton_matmul.int8_matmul_triton(torch.randn(3, 32), codes, scale, offset, 32)
    with pytest.raises(ValueError, match=r"activation must be 2-D fp32, bf16 or fp16"):
        triton_matmul.int8_matmul_triton(torch.randn(3, 64).double(), codes, scale, offset, 32)


# ---------------------------------------------------------------------------------------------------
# dispatch and Int8Linear


def test_dispatch_uses_the_fused_kernel_only_where_asked_and_possible(monkeypatch):
    calls = []
    real = triton_matmul.int8_matmul_triton
    monkeypatch.setattr(triton_matmul, "int8_matmul_triton", lambda *a: calls.append(1) or real(*a))
    codes, scale, offset = quantize_groupwise(torch.randn(48, 64), 32)
    x = torch.randn(2, 5, 64)
    unfused = torch.nn.functional.linear(x, dequantize_groupwise(codes, scale, offset, 32))
    # CPU tensors: "auto" is the reference path, fused or not (bit for bit)
    assert torch.equal(dispatch.linear(x, codes, scale, offset, 32, "auto", "fused"), unfused) and not calls
    with pytest.raises(ValueError, match=r"matmul = 'gemm'; allowed: \('dequantize', 'fused'\)"):
        dispatch.linear(x, codes, scale, offset, 32, "auto", "gemm")
    if INTERPRETED:  # "triton" runs the kernels in the interpreter; compiled, it refuses CPU tensors
        assert torch.equal(dispatch.linear(x, codes, scale, offset, 32, "triton", "dequantize"), unfused)
        assert not calls
        y = dispatch.linear(x, codes, scale, offset, 32, "triton", "fused")
        assert calls == [1] and y.shape == (2, 5, 48)
        w_hat = dequantize_groupwise(codes, scale, offset, 32)
        assert_within_accumulation_error(y.reshape(10, 48), x.reshape(10, 64), w_hat.t(), "dispatch.linear")
        bad = quantize_groupwise(torch.randn(12, 40), 24)  # no Triton kernel takes a group of 24
        with pytest.raises(ValueError, match="group size 24 must be a power of two"):
            dispatch.linear(torch.randn(3, 40), *bad, 24, "triton", "fused")
        y = dispatch.linear(torch.randn(3, 40), *bad, 24, "auto", "fused")  # "auto": the reference path
        assert y.shape == (3, 12) and calls == [1]
    else:
        with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors"):
            dispatch.linear(x, codes, scale, offset, 32, "triton", "dequantize")


# ---------------------------------------------------------------------------------------------------
# autotuning keys, configs and the fused/dequantize choice (pure logic: CPU)


def test_m_is_bucketed_for_the_autotuner():
    assert [triton_matmul.m_bucket(M) for M in (1, 2, 16, 17, 48, 49, 64, 65, 256, 2048, 2049)] == \
        [16, 16, 16, 32, 64, 64, 64, 128, 256, 2048, 4096]
    assert len({triton_matmul.m_bucket(M) for M in range(2, 50)}) == 3  # generation's prompts 2..49: 3 tunings, not 48
    assert "M" not in triton_matmul.TUNE_KEY and "M_BUCKET" in triton_matmul.TUNE_KEY


def test_configs_fit_in_shared_memory():
    KiB, limit = 1024, triton_matmul.SMEM_LIMIT
    # the audit's finding: the forward's widest tile as a dx config needs over 227 KiB (260 KiB compiled)
    assert triton_matmul.smem_bytes("grad_input", 128, 256, 64, 3, 2) > limit >= 227 * KiB
    assert (128, 256, 64, 3, 8) not in triton_matmul.GRAD_INPUT_SHAPES
    for kind, shapes in (("forward", triton_matmul.FORWARD_SHAPES), ("grad_input", triton_matmul.GRAD_INPUT_SHAPES)):
        assert all(triton_matmul.smem_bytes(kind, *c[:4], 2) <= limit for c in shapes), kind  # bf16/fp16: all fit
        assert all(triton_matmul.MAX_BLOCK_K % c[2] == 0 for c in shapes)
    # fp32 operands (the IEEE path) double the tiles: the pruner drops what no longer fits, keeps the rest
    fp32 = triton_matmul.fitting(triton_matmul.GRAD_INPUT_SHAPES, "grad_input", 4)
    assert 0 < len(fp32) < len(triton_matmul.GRAD_INPUT_SHAPES)
    assert all(triton_matmul.smem_bytes("grad_input", *c[:4], 4) <= limit for c in fp32)
    assert triton_matmul.fitting(triton_matmul.FORWARD_SHAPES, "forward", 2, limit=1) == [(32, 64, 32, 5, 2)]


def test_pruner_reads_the_operand_width_of_the_call():
    prune = triton_matmul._pruner("grad_input")
    configs = triton_matmul._configs(triton_matmul.GRAD_INPUT_SHAPES)
    dy16, dy32 = torch.empty(2, 2, dtype=torch.bfloat16), torch.empty(2, 2)
    assert prune(configs, {"dy_ptr": dy16}, IEEE=False) == configs
    kept = prune(configs, {"dy_ptr": dy32}, IEEE=True)
    assert len(kept) == len(triton_matmul.fitting(triton_matmul.GRAD_INPUT_SHAPES, "grad_input", 4)) < len(configs)
    assert prune(configs, {"dy_ptr": dy16}, IEEE=True) == kept  # IEEE: bf16 is widened to fp32 before the dot


def test_auto_takes_the_dequantize_path_where_fused_loses(monkeypatch):
    assert triton_matmul.fused_expected_faster(256, 4096, 128)
    assert not triton_matmul.fused_expected_faster(triton_matmul.FUSED_MIN_M - 1, 4096, 128)  # few rows
    assert not triton_matmul.fused_expected_faster(256, 5461, 128)  # groups straddle rows: gathered scales
    assert not triton_matmul.fused_expected_faster(256, 4096, 32)  # a group smaller than BLOCK_K: gathered
    # dispatch, as on a GPU: every check passes, only the expected speed decides for "auto"
    monkeypatch.setattr(dispatch, "_use_triton", lambda *a: True)
    monkeypatch.setattr(triton_matmul, "check_supported", lambda *a: None)
    codes, scale, offset = quantize_groupwise(torch.randn(64, 128), 64)
    for M, want in ((8, False), (63, False), (64, True), (300, True)):
        a = torch.empty(M, 128)
        assert dispatch._use_fused_matmul("fused", "auto", a, codes, scale, offset, 64) is want, M
        assert dispatch._use_fused_matmul("fused", "triton", a, codes, scale, offset, 64)  # forced: always
        assert not dispatch._use_fused_matmul("dequantize", "auto", a, codes, scale, offset, 64)


@pytest.mark.skipif(not INTERPRETED, reason="CPU interpreter case (a GPU machine runs it in the subprocess)")
@pytest.mark.parametrize("autocast", [False, True])
def test_int8_linear_fused_matches_dequantize_forward_and_backward_cpu(autocast):
    torch.manual_seed(3)
    w = torch.randn(48, 64) * 0.05
    outs = {}
    for matmul in ("dequantize", "fused"):
        layer = Int8Linear.from_float(w, group_size=32)
        layer.kernels, layer.matmul = "triton", matmul
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
        y.backward(g)
        outs[matmul] = (y, x.grad, layer.weight_grad)
    (y0, dx0, dw0), (y1, dx1, dw1) = outs["dequantize"], outs["fused"]
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    assert y1.dtype == y0.dtype and torch.allclose(y1.float(), y0.float(), **tol)
    assert torch.allclose(dx1, dx0, **tol)
    assert not torch.equal(dx1, torch.zeros_like(dx1))
    # dW = dyᵀ x does not touch Ŵ; without autocast dy is the same tensor g, so dW is bit-identical
    if not autocast:
        assert torch.equal(dw1, dw0)
    else:
        assert torch.allclose(dw1.float(), dw0.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED, reason="CPU interpreter case (a GPU machine runs it in the subprocess)")
def test_tiny_llama_loss_and_gradients_agree_between_matmul_paths_cpu():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    results = {}
    for matmul in ("dequantize", "fused"):
        q = quant_cfg(group_size=32)
        q.kernels, q.matmul = "triton", matmul
        model = build_model(tiny_model_cfg(), q, device="cpu", seed=11)
        loss = lm_loss(model, ids[:, :-1], ids[:, 1:], torch.float32)
        loss.backward()
        grads = {n: m.weight_grad for n, m in model.named_modules() if isinstance(m, Int8Linear)}
        assert len(grads) == 14 and all(g is not None for g in grads.values())
        assert all(m.matmul == matmul for m in model.modules() if isinstance(m, Int8Linear))
        results[matmul] = (loss.detach(), grads)
    (l0, g0), (l1, g1) = results["dequantize"], results["fused"]
    assert abs(l0.item() - l1.item()) < 1e-5 * abs(l0.item())
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-4, atol=1e-7), name


# ---------------------------------------------------------------------------------------------------
# compiled code, without a GPU: the kernels compile for sm_90 to wgmma, with the dequantize unfused

AOT_SCRIPT = r"""
from qtrain.quant import triton_matmul as tm

def mm_ptx(fn, names, constexprs, warps, stages):
    types = ["*bf16", "*u8", "*fp32", "*fp32", "*bf16"] + ["i32"] * 6
    signature = {n: t for n, t in zip(names, types)} | {k: "constexpr" for k in constexprs}
    return ptx(fn, signature, constexprs, num_warps=warps, num_stages=stages)

meta = {"GROUP": 128, "SWIZZLE": 8, "RNE_BF16": False, "IEEE": False}
fwd = ["x_ptr", "codes_ptr", "scale_ptr", "offset_ptr", "y_ptr", "M", "N", "K", "stride_xm", "stride_ym", "M_BUCKET"]
bwd = ["dy_ptr", "codes_ptr", "scale_ptr", "offset_ptr", "dx_ptr", "M", "N", "K", "stride_dym", "stride_dxm",
       "M_BUCKET"]
out = {}
for aligned in (True, False):
    tag = "" if aligned else " (gathered scales)"
    out["forward" + tag] = mm_ptx(tm._int8_matmul_kernel, fwd,
                                  {**meta, "ALIGNED": aligned, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, 8, 3)
    out["grad_input" + tag] = mm_ptx(tm._int8_matmul_grad_input_kernel, bwd,
                                     {**meta, "ALIGNED": aligned, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 4)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_to_tensor_core_mma(tmp_path):
    for name, code in compile_for_sm90(AOT_SCRIPT, tmp_path).items():
        assert "wgmma.mma_async" in code, f"{name}: no Hopper tensor-core MMA"
        assert "cvt.rn.bf16" in code, f"{name}: Ŵ is not rounded to nearest into bf16"
        assert "fma.rn.f32" not in code, f"{name}: codes*scale + offset contracted into an FMA (torch rounds twice)"
