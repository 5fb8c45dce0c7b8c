"""Triton twins of the int8 kernels against their torch references (quant/triton_kernels.py, quant/dispatch.py).

Every kernel test runs on device "cpu" (Triton's interpreter) and "cuda" (compiled; skips without a GPU).
Deterministic steps are compared bitwise; SR with in-kernel Philox is checked in distribution.

Interpreter or compiler is decided once per process, when triton is imported (TRITON_INTERPRET is read
then, also for Triton's own tl.rand4x). On a machine without CUDA this module sets it before importing
triton, so the "cpu" cases run here. If triton was already imported compiled (a GPU machine, or an earlier
module imported it), the "cpu" cases are skipped here and run in a fresh process by
test_cpu_cases_in_an_interpreter_process.
"""

import importlib
import importlib.util
import math
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` of the process
triton = pytest.importorskip("triton", reason="triton is a test extra: pip install -e '.[test]'")
tl = triton.language

from conftest import compile_for_sm90, interpreter_process_test

from qtrain.core.seeding import update_seed
from qtrain.quant import dispatch, triton_kernels
from qtrain.quant.groupwise import dequantize_groupwise, quantize_groupwise
from qtrain.quant.int8_update import int8_scaled_update_

sr_module = importlib.import_module("qtrain.quant.stochastic_round")  # the module (quant/__init__ exports a function)
SHAPES = [(16, 64, 32), (12, 40, 32)]  # (m, n, g); 12x40 in groups of 32 straddles rows
ONE_MINUS_ULP = 1 - 2**-24  # the largest fp32 below 1


test_cpu_cases_in_an_interpreter_process = interpreter_process_test(__file__)


def quantized(m, n, g, device, seed=1234, meta_dtype=torch.float32):  # seed not 0: the autouse fixture
    # seeds torch with 0, and a gradient equal to the weight would scale the grid instead of moving it
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen) * 0.05
    return tuple(t.to(device) for t in quantize_groupwise(w, g, meta_dtype))


def grad_scale_of(kind, m, n, device):
    """APOLLO-Mini's 0-dim factor, or channel APOLLO's (1, n) / (m, 1) factors."""
    shape = {"scalar": (), "col": (1, n), "row": (m, 1)}[kind]
    return (torch.rand(shape) + 0.5).to(device)


def reference_update(codes, scale, offset, g, grad, s, lr, wd, uniform, monkeypatch, max_chunk_elems=1 << 22):
    """int8_scaled_update_ itself, its sr_uniforms draws replaced by `uniform` consumed in element order."""
    flat, used = uniform.reshape(-1), [0]

    def draw(shape, generator, device):
        k = math.prod(shape)
        out = flat[used[0]:used[0] + k].reshape(shape)
        used[0] += k
        return out.to(device, torch.float32, copy=True)  # a fresh tensor, as sr_uniforms': the reference writes into it

    with monkeypatch.context() as mp:
        mp.setattr(sr_module, "sr_uniforms", draw)
        int8_scaled_update_(codes, scale, offset, g, grad, s, lr, wd, torch.Generator(), max_chunk_elems)
    assert used[0] == flat.numel()


def assert_bitwise_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = actual.reshape(-1).view(torch.uint8) != expected.reshape(-1).view(torch.uint8)
    assert not diff.any(), f"{what}: {int(diff.sum())} bytes differ"


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.find_spec("qtrain.quant.triton_kernels")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a private copy: the imported module is left alone
    assert module.HAVE_TRITON is False and module.interpret_mode() is False
    codes, scale, offset = quantized(4, 32, 32, "cpu")
    with pytest.raises(ValueError, match="triton is not installed.*backend='torch'"):
        module.dequantize_triton(codes, scale, offset, 32)


# ---------------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,g", SHAPES)
def test_dequantize_bit_exact(device, m, n, g, dtype, meta):
    codes, scale, offset = quantized(m, n, g, device, meta_dtype=meta)
    codes = torch.randint(0, 256, (m, n), dtype=torch.uint8).to(device)  # every code value, not only a grid
    got = triton_kernels.dequantize_triton(codes, scale, offset, g, dtype)
    assert_bitwise_equal(got, dequantize_groupwise(codes, scale, offset, g, dtype), f"dequantize to {dtype}")


def test_dequantize_bf16_rounds_ties_to_even(device):
    # w = 0 * scale + offset = offset exactly; offsets halfway between two bf16 (7 mantissa bits) values
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 - 2**-9, 3 * 2**-9 + 2**-17, 0.0])
    codes = torch.zeros(6, 32, dtype=torch.uint8, device=device)
    scale = torch.full((6,), 1e-3, device=device)
    got = triton_kernels.dequantize_triton(codes, scale, ties.to(device), 32, torch.bfloat16)
    expected = ties.to(torch.bfloat16)[:, None].expand(6, 32).to(device)
    assert_bitwise_equal(got, expected, "ties")
    assert got[0, 0] == 1.0 and got[1, 0] == 1 + 2**-6 and got[3, 0] == 2.0  # even mantissa wins, carry works


# ---------------------------------------------------------------------------------------------------
# fused update, same uniforms as the reference: bitwise equal


@pytest.mark.parametrize("meta", [torch.float32, torch.bfloat16], ids=["meta32", "meta16"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("scale_kind", ["scalar", "col", "row"])
@pytest.mark.parametrize("m,n,g", SHAPES)
def test_update_with_same_uniforms_matches_reference(device, monkeypatch, m, n, g, scale_kind, lr_kind, wd, meta):
    codes, scale, offset = quantized(m, n, g, device, meta_dtype=meta)
    grad = torch.randn(m, n, dtype=torch.bfloat16).to(device)  # bf16, as autograd hands it over
    s = grad_scale_of(scale_kind, m, n, device)
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01, device=device)
    u = sr_module.sr_uniforms((m, n), torch.Generator().manual_seed(3), "cpu").to(device)  # the 2⁻¹⁶ lattice
    ref = [t.clone() for t in (codes, scale, offset)]
    # chunks of 4 rows (= lcm(n, g) / n for 12x40): the reference must consume the uniforms chunk by chunk
    reference_update(*ref, g, grad, s, lr, wd, u, monkeypatch, max_chunk_elems=4 * n)
    triton_kernels.int8_scaled_update_triton_(codes, scale, offset, g, grad, s, lr, wd, seed=7, uniform=u)
    for name, got, want in zip(("codes", "scale", "offset"), (codes, scale, offset), ref):
        assert_bitwise_equal(got, want, name)
    assert (codes != quantized(m, n, g, device, meta_dtype=meta)[0]).any()  # the step moved codes


def test_zero_update_keeps_the_weight(device):
    codes, scale, offset = quantized(12, 40, 32, device)
    before = [t.clone() for t in (codes, scale, offset)]
    grad = torch.zeros(12, 40, device=device)
    triton_kernels.int8_scaled_update_triton_(codes, scale, offset, 32, grad, torch.tensor(1.0, device=device),
                                              0.01, 0.0, seed=3)
    for name, got, want in zip(("codes", "scale", "offset"), (codes, scale, offset), before):
        assert_bitwise_equal(got, want, name)


# ---------------------------------------------------------------------------------------------------
# fused update, in-kernel Philox


def sr_bias_bound(delta, target):
    """|E[SR(W')] - W'| apart from sampling noise, u = 2⁻²⁴: the uniform lattice (< 2⁻¹⁷ steps), the grid
    position from an fp32 reciprocal and a product (<= 3u·255 steps), and the fp32 dequantize / update /
    decay roundings of W' itself (<= 5u·|W'| plus the same in the grid offset)."""
    u = 2.0**-24
    return delta * (2.0**-17 + 3 * u * 255) + 10 * u * target.abs().max()


@triton.jit
def _philox_words_kernel(out_ptr, seed, n_octets, BLOCK: tl.constexpr):
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = q < n_octets
    r0, r1, r2, r3 = tl.randint4x(seed, q)
    tl.store(out_ptr + 4 * q, r0, mask=mask)
    tl.store(out_ptr + 4 * q + 1, r1, mask=mask)
    tl.store(out_ptr + 4 * q + 2, r2, mask=mask)
    tl.store(out_ptr + 4 * q + 3, r3, mask=mask)


def philox_uniforms(seed, shape, device):
    """The documented stream, written out: element i gets (k + 1/2)·2⁻¹⁶, k the 16-bit half i % 2 (low
    first) of word (i % 8) // 2 of tl.randint4x(seed, i // 8)."""
    numel = math.prod(shape)
    words = torch.empty(numel // 2, dtype=torch.int32, device=device)  # 4 words per octet of elements
    _philox_words_kernel[(triton.cdiv(numel // 8, 256),)](words, seed, numel // 8, BLOCK=256)
    w = words.long() & 0xFFFFFFFF
    halves = torch.stack([w & 0xFFFF, w >> 16], dim=1).reshape(-1)  # element 2j <- low half of word j
    return ((halves.float() + 0.5) * 2.0**-16).reshape(shape)


def run_philox(codes, scale, offset, g, grad, s, lr, wd, seed):
    out = [t.clone() for t in (codes, scale, offset)]
    triton_kernels.int8_scaled_update_triton_(*out, g, grad, s, lr, wd, seed=seed)
    return out


def step_inputs(m, n, g, device):
    codes, scale, offset = quantized(m, n, g, device)
    grad = torch.randn(m, n).to(device)
    return codes, scale, offset, g, grad, grad_scale_of("row", m, n, device), 3e-3, 0.1


def test_philox_stream_is_the_documented_one(device):
    args = step_inputs(12, 40, 32, device)
    got = run_philox(*args, seed=11)
    want = [t.clone() for t in args[:3]]
    triton_kernels.int8_scaled_update_triton_(*want, *args[3:], seed=0, uniform=philox_uniforms(11, (12, 40), device))
    for name, a, b in zip(("codes", "scale", "offset"), got, want):
        assert_bitwise_equal(a, b, name)


def test_philox_codes_are_floor_or_ceil_of_the_grid_position(device, monkeypatch):
    args = step_inputs(12, 40, 32, device)
    codes, scale, offset = run_philox(*args, seed=5)
    # the reference with u = 0 rounds every fractional v up, with u = 1 - 2^-24 every v down (frac < 1 - 2^-24
    # never holds for an fp32 frac): the exact fp32 ceil(v) and floor(v) of the same grid positions
    bounds = []
    for u in (0.0, ONE_MINUS_ULP):
        ref = [t.clone() for t in args[:3]]
        reference_update(*ref, *args[3:], torch.full((12, 40), u, device=device), monkeypatch)
        assert_bitwise_equal(scale, ref[1], "scale")  # ranges do not depend on the uniforms
        assert_bitwise_equal(offset, ref[2], "offset")
        bounds.append(ref[0])
    ceil, floor = bounds
    assert ((codes == floor) | (codes == ceil)).all()
    moving = floor != ceil
    assert moving.float().mean() > 0.9  # almost every position is fractional: the check has teeth
    up = (codes == ceil)[moving].float().mean()
    assert 0.2 < up < 0.8, f"fraction rounded up {up:.3f}"


def test_philox_same_seed_reproduces_other_seed_differs(device):
    args = step_inputs(16, 64, 32, device)
    a, b, c = run_philox(*args, seed=123), run_philox(*args, seed=123), run_philox(*args, seed=124)
    for name, x, y in zip(("codes", "scale", "offset"), a, b):
        assert_bitwise_equal(x, y, name)
    assert (a[0] != c[0]).float().mean() > 0.2  # codes at fractional positions redraw
    torch.testing.assert_close(a[1], c[1], rtol=0, atol=0)  # the ranges are deterministic


def test_philox_does_not_depend_on_the_tile(device, monkeypatch):
    args = step_inputs(12, 40, 32, device)
    small = run_philox(*args, seed=9)
    monkeypatch.setattr(triton_kernels, "TILE_ELEMS", 1 << 12)  # 128 groups per program instead of 64
    large = run_philox(*args, seed=9)
    for name, x, y in zip(("codes", "scale", "offset"), small, large):
        assert_bitwise_equal(x, y, name)


def test_philox_sr_is_unbiased(device, monkeypatch):
    # N = 4 seeds x 2500 replicas of one 4x64 weight: each replica's elements draw from their own Philox
    # counters, so the replicas are independent samples of the same update. With Δ the new step,
    # SR error per draw is in [-Δ, Δ] with variance <= Δ²/4, so the mean of N draws lies within
    # 4·(Δ/2)/√N of the exact update (docs/algorithms.md §12: 4 sigma). The mean is accumulated in fp64.
    # Deterministic terms on top (sr_bias_bound): 16-bit uniforms bias each rounding by < 2⁻¹⁷ of a step, and
    # v = (w - lo)·(1/Δ) with an fp32 reciprocal is within 3u·255 codes of the exact position.
    monkeypatch.setattr(triton_kernels, "TILE_ELEMS", 1 << 16)  # the interpreter's cost is per program
    m, n, g, reps, seeds = 4, 64, 32, 2500, (1, 2, 3, 4)
    N = reps * len(seeds)
    codes, scale, offset = quantized(m, n, g, device)
    grad = torch.randn(m, n).to(device)
    s, lr, wd = torch.tensor(0.8, device=device), 4e-4, 0.1
    big = (codes.repeat(reps, 1), scale.repeat(reps), offset.repeat(reps), g, grad.repeat(reps, 1), s, lr, wd)
    code_sum = torch.zeros(m, n, dtype=torch.float64, device=device)
    for seed in seeds:
        new_codes, new_scale, new_offset = run_philox(*big, seed=seed)
        code_sum += new_codes.reshape(reps, m, n).double().sum(0)
        assert (new_scale.reshape(reps, -1) == new_scale[: m * n // g]).all()  # same ranges in every replica
    delta = new_scale[: m * n // g].double().repeat_interleave(g).reshape(m, n)
    zero = new_offset[: m * n // g].double().repeat_interleave(g).reshape(m, n)
    mean = code_sum / N * delta + zero
    # naive fp64 target: W' = (W - lr·s·G)·(1 - lr·wd) from the same fp32 inputs
    w = codes.double().reshape(-1, g) * scale.double()[:, None] + offset.double()[:, None]
    target = (w.reshape(m, n) - lr * s.double() * grad.double()) * (1 - lr * wd)
    bound = 4 * (delta / 2) / math.sqrt(N) + sr_bias_bound(delta, target)
    err = (mean - target).abs()
    assert (err <= bound).all(), f"worst |mean - target| / bound = {(err / bound).max():.2f}"
    nearest = ((target - zero) / delta).round() * delta + zero
    assert ((nearest - target).abs() > bound).float().mean() > 0.5  # the bound is tight enough to matter


# ---------------------------------------------------------------------------------------------------
# compiled code, without a GPU: Triton compiles for sm_90 on any machine (ptxas ships with the wheel)

AOT_SCRIPT = r"""
from qtrain.quant import triton_kernels as tk

g = 128
out = {"dequantize_bf16": ptx(
    tk._dequantize_kernel,
    {"codes_ptr": "*u8", "scale_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16", "num_groups": "i32",
     "GROUP": "constexpr", "BLOCK_G": "constexpr", "OUT_BF16": "constexpr"},
    {"GROUP": g, "BLOCK_G": tk.TILE_ELEMS // g, "OUT_BF16": True}, num_warps=tk.NUM_WARPS)}
# lr: a float, an fp32 pointer or (qtrain.core.step_state, a capturable step) an fp64 pointer with an int64 seed pointer
for name, mode, lr, wd, uniform, meta, seed in [
        ("update_scalar_philox", 0, "fp32", False, False, "fp32", "i32"),
        ("update_row_tensor_lr_uniform", 2, "*fp32", True, True, "fp32", "i32"),
        ("update_scalar_philox_bf16_meta", 0, "fp32", False, False, "bf16", "i32"),
        ("update_scalar_philox_device_lr_and_seed", 0, "*fp64", False, False, "bf16", "*i64")]:
    out[name] = ptx(tk._update_kernel, {
        "codes_ptr": "*u8", "scale_ptr": f"*{meta}", "offset_ptr": f"*{meta}", "grad_ptr": "*bf16", "s_ptr": "*fp32",
        "lr": lr, "decay": "fp32", "weight_decay": "fp32",
        "uniform_ptr": "*fp32" if uniform else "constexpr", "seed": seed, "num_groups": "i32", "n_cols": "i32",
        "GROUP": "constexpr", "BLOCK_G": "constexpr", "SCALE_MODE": "constexpr", "LR_IS_PTR": "constexpr",
        "HAS_WD": "constexpr", "USE_UNIFORM": "constexpr", "META_BF16": "constexpr", "SEED_IS_PTR": "constexpr"},
        {"GROUP": g, "BLOCK_G": tk.TILE_ELEMS // g, "SCALE_MODE": mode, "LR_IS_PTR": lr.startswith("*"), "HAS_WD": wd,
         "USE_UNIFORM": uniform, "META_BF16": meta == "bf16", "SEED_IS_PTR": seed.startswith("*"),
         **({} if uniform else {"uniform_ptr": None})},
        num_warps=tk.NUM_WARPS)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_the_reference_roundings(tmp_path):
    ptx = compile_for_sm90(AOT_SCRIPT, tmp_path)
    per_thread = triton_kernels.TILE_ELEMS // (32 * triton_kernels.NUM_WARPS)  # 16 elements
    for name, code in ptx.items():
        assert "ld.global.v4.b32" in code, f"{name}: codes are not loaded 16 bytes at a time"
        assert "div.approx" not in code and "div.full" not in code, f"{name}: approximate division"
        fmas = code.count("fma.rn.f32")
        if name.startswith("dequantize"):
            assert fmas == 0, f"{name}: {fmas} fused multiply-adds; torch rounds codes*scale and +offset apart"
        else:  # exactly the explicit tl.fma of W + G*(s*-lr) per element, nothing contracted
            assert fmas == per_thread, f"{name}: {fmas} fma.rn.f32, expected {per_thread}"
            # per group, not per element: the new scale and its reciprocal (v = (w - lo) * (1/scale))
            assert 1 <= code.count("div.rn.f32") < per_thread, f"{name}: {code.count('div.rn.f32')} div.rn.f32"
            if "philox" in name:  # 8 elements per Philox4x32-10 call: 2 calls of 10 rounds per thread, not 4
                rounds = code.count("mul.hi.u32")  # 2 per round (37 measured with Triton 3.9; 73 at 4 per call)
                assert rounds <= 2 * 10 * per_thread // 8, f"{name}: {rounds} mul.hi.u32"


# ---------------------------------------------------------------------------------------------------
# dispatcher


def test_update_seed_is_31_bit_and_stateless():
    seeds = [update_seed(0, uid, step) for uid in (1, 2) for step in range(1, 50)]
    assert all(0 <= x < 2**31 for x in seeds) and len(set(seeds)) == len(seeds)
    assert update_seed(0, 1, 7) == update_seed(0, 1, 7) != update_seed(1, 1, 7)


def test_dispatch_cpu_auto_is_the_reference_with_a_seeded_generator():
    args = step_inputs(12, 40, 32, "cpu")
    via_dispatch = [t.clone() for t in args[:3]]
    dispatch.int8_scaled_update_(*via_dispatch, *args[3:], generator_seed=42)  # backend="auto" -> torch on CPU
    direct = [t.clone() for t in args[:3]]
    int8_scaled_update_(*direct, *args[3:], torch.Generator("cpu").manual_seed(42))
    for name, x, y in zip(("codes", "scale", "offset"), via_dispatch, direct):
        assert_bitwise_equal(x, y, name)
    deq = dispatch.dequantize(*args[:4], torch.bfloat16)
    assert_bitwise_equal(deq, dequantize_groupwise(*args[:4], torch.bfloat16), "dequantize")


def test_dispatch_triton_backend_runs_the_kernel(device):
    args = step_inputs(12, 40, 32, device)
    via_dispatch = [t.clone() for t in args[:3]]
    dispatch.int8_scaled_update_(*via_dispatch, *args[3:], generator_seed=42, backend="triton")
    for name, x, y in zip(("codes", "scale", "offset"), via_dispatch, run_philox(*args, seed=42)):
        assert_bitwise_equal(x, y, name)
    deq = dispatch.dequantize(*args[:4], torch.float16, backend="triton")
    assert_bitwise_equal(deq, dequantize_groupwise(*args[:4], torch.float16), "dequantize")


def test_dispatch_errors_name_the_fix(monkeypatch):
    args = step_inputs(12, 40, 32, "cpu")
    monkeypatch.setattr(triton_kernels, "interpret_mode", lambda: False)  # as in a compiled-mode process
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        dispatch.int8_scaled_update_(*args, generator_seed=1, backend="triton")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"backend = 'cuda'; allowed: \('auto', 'torch', 'triton'\)"):
        dispatch.dequantize(*args[:4], backend="cuda")
    codes, scale, offset = quantize_groupwise(torch.randn(12, 40), 32)
    with pytest.raises(ValueError, match=r"scale must be contiguous fp32 or bf16.*backend='torch'"):
        dispatch.dequantize(codes, scale.half(), offset.half(), 32, backend="triton")
    codes, scale, offset = quantize_groupwise(torch.randn(12, 40), 24)
    with pytest.raises(ValueError, match=r"group size 24 must be a power of two"):
        dispatch.dequantize(codes, scale, offset, 24, backend="triton")
    with pytest.raises(ValueError, match=r"seed = 2147483648 must be in \[0, 2\^31\)"):
        triton_kernels.int8_scaled_update_triton_(*args, seed=2**31)
