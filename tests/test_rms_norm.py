"""The fused RMSNorm (qtrain/model/rms_norm.py) against transformers' own LlamaRMSNorm.

Kernel cases run on "cpu" (Triton's interpreter) and "cuda" (compiled; skipped without a GPU); the oracle is
transformers' module run on CPU copies of the same inputs, in the same dtypes.

Bounds (u = 2⁻²⁴): the kernel and torch sum a row's squares, and dweight's rows, in different orders. A sum of
k terms in any order is within γ_k·Σ|terms| of the exact one (γ_k ≈ k·u), so two orders differ by at most
2γ_k·Σ|terms|; every further fp32 operation adds one rounding (u) on each side. fp32 results are checked
against that bound element by element; a bf16 result rounds the fp32 value once, so where the two fp32
values straddle a rounding boundary they differ by one bf16 ulp, and nowhere by more.
"""

import os
import sys

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` of the process
pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")

from conftest import interpreter_process_test, quant_cfg, tiny_model_cfg

from qtrain.model import rms_norm as rn

U = 2.0**-24


test_cpu_cases_in_an_interpreter_process = interpreter_process_test(__file__)


def norm_module(d, w_dtype, eps=1e-6):
    m = LlamaRMSNorm(d, eps=eps).to(w_dtype)
    with torch.no_grad():
        m.weight.copy_(1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(1)))
    return m


def bf16_ulps(a, b):
    """Distance in bf16 steps between two bf16 tensors of the same signs (their bit patterns as integers)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


# (rows, d): d not a power of two (masked tile), rows not a multiple of the backward's rows per program
@pytest.mark.parametrize("rows,d", [(37, 96), (16, 64)])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_fused_rms_norm_matches_transformers(device, rows, d, x_dtype, w_dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, d, generator=gen) * 3).to(x_dtype)
    dy_dtype = torch.float32 if torch.float32 in (x_dtype, w_dtype) else torch.bfloat16
    dy = torch.randn(rows, d, generator=gen).to(dy_dtype)
    ref_mod, mod = norm_module(d, w_dtype), norm_module(d, w_dtype).to(device)
    xr, xf = x.clone().requires_grad_(), x.to(device).requires_grad_()
    y_ref = ref_mod(xr)
    y_ref.backward(dy)
    y = rn.rms_norm(mod, xf, "triton")
    y.backward(dy.to(device))
    assert y.dtype == y_ref.dtype and xf.grad.dtype == x_dtype and mod.weight.grad.dtype == w_dtype

    x32 = x.float()
    ms = x32.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(ms + 1e-6)
    e_rstd = (d + 4) * U  # relative: the sum of d squares in two orders, the division, sqrt and reciprocal
    w32 = ref_mod.weight.detach().float()
    # y = w·h, h = x·rstd: relative e_rstd + 2u on each side
    if y.dtype == torch.float32:
        bound = (2 * e_rstd + 4 * U) * (w32 * x32 * rstd).abs()
        assert ((y.detach().cpu() - y_ref.detach()).abs() <= bound).all()
    else:
        assert bf16_ulps(y.detach().cpu(), y_ref.detach()).max() <= 1
    # dx = dn·rstd - x·rstd³·Σ(dn·x)/d with dn = dy·w (rounded to h's dtype): bounded term by term
    dn = (dy.float() * w32).to(dy_dtype).to(x_dtype).float()
    s = (dn * x32).abs().sum(-1, keepdim=True) / d
    scale = (dn.abs() * rstd + x32.abs() * rstd**3 * s)
    if x_dtype == torch.float32:
        bound = (3 * e_rstd + 2 * (d + 6) * U) * scale
        assert ((xf.grad.cpu() - xr.grad).abs() <= bound).all()
    else:  # the fp32 values agree to the bound above; then one bf16 rounding each
        bound = (3 * e_rstd + 2 * (d + 6) * U) * scale + 2**-7 * xr.grad.float().abs()  # 1 ulp: 2⁻⁷ relative
        assert ((xf.grad.cpu().float() - xr.grad.float()).abs() <= bound).all()
    # dweight = Σ_rows dy·h: two summation orders of `rows` products, each product's h within e_rstd
    h = (x32 * rstd).to(x_dtype).float()
    terms = (dy.float() * h).abs().sum(0)
    bound = (2 * (rows + 2) * U + 2 * e_rstd) * terms
    if dy_dtype == torch.bfloat16:  # autograd rounds each product dy·h to bf16 (half an ulp: 2⁻⁸ relative)
        bound = bound + 2**-8 * terms
    if w_dtype == torch.bfloat16:  # one final bf16 rounding on each side
        bound = bound + 2**-7 * ref_mod.weight.grad.float().abs()
    assert ((mod.weight.grad.cpu().float() - ref_mod.weight.grad.float()).abs() <= bound).all()


def test_cpu_auto_is_transformers_own_forward_bit_for_bit(one_thread):
    """On the CPU ("auto") the patched norms run transformers' code: a model is unchanged to the last bit."""
    from qtrain.model.builder import build_model

    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = []
    for fused in (True, False):
        model = build_model(tiny_model_cfg(), quant_cfg(enabled=False), "cpu", seed=0)
        if not fused:  # back to the class's forward
            for m in model.modules():
                m.__dict__.pop("forward", None)
        assert sum("forward" in m.__dict__ for m in model.modules()) == (5 if fused else 0)  # 2 x 2 layers + final
        logits = model(x).logits
        logits.square().mean().backward()
        outs.append((logits, [p.grad for p in model.parameters()]))
    (a, ga), (b, gb) = outs
    assert torch.equal(a, b) and all(torch.equal(g, h) for g, h in zip(ga, gb))


def test_layouts_the_kernel_cannot_take_fall_back_or_say_why():
    x = torch.randn(4, 8)
    assert rn.rms_norm_problems(x, torch.ones(8)) == []
    assert "fp32/bf16 only" in rn.rms_norm_problems(x.half(), torch.ones(8))[0]
    assert "weight of shape (8,)" in rn.rms_norm_problems(x, torch.ones(7))[0]
    with pytest.raises(ValueError, match="the fused RMSNorm cannot run in Triton"):
        rn.rms_norm(norm_module(7, torch.float32), torch.randn(4, 8), "triton")
