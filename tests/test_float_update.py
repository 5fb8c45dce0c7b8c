"""The one-kernel float weight update (qtrain.optim.float_update) against its torch reference apply_update_.

In Triton's interpreter on CPU (compiled on CUDA: the "cuda" cases). Given the same 16 random bits per
element the kernel reproduces apply_update_ bit for bit: fp32 weights, bf16 with stochastic rounding,
bf16 to nearest; dense directions and APOLLO's gradient scales (tensor, column, row); with and without decay.
"""

import pytest
import torch

from qtrain.optim.base import Update, apply_update_
from qtrain.optim.float_update import float_update_, float_update_triton_
from qtrain.quant import triton_kernels

SHAPE = (48, 80)  # 3840 elements: two programs, the second one partly masked


def _case(kind: str, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(SHAPE, generator=gen) * 0.02).to(dtype)
    g = torch.randn(SHAPE, generator=gen).to(torch.bfloat16 if kind != "dense" else torch.float32)
    scale = {"dense": None, "tensor": torch.tensor(0.37), "col": torch.rand(1, SHAPE[1], generator=gen),
             "row": torch.rand(SHAPE[0], 1, generator=gen)}[kind]
    update = Update(dense=torch.randn(SHAPE, generator=gen)) if kind == "dense" else Update(grad_scale=scale)
    move = lambda t: None if t is None else t.to(device)
    return w.to(device), Update(move(update.dense), move(update.grad_scale)), g.to(device)


@pytest.mark.parametrize("kind", ["dense", "tensor", "col", "row"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_apply_update_bit_for_bit(kernel_device, kind, weight_decay, dtype):
    w, update, g = _case(kind, dtype, kernel_device)
    for sr in (False, True):
        expect, got = w.clone(), w.clone()
        gen = torch.Generator(kernel_device).manual_seed(11) if sr and dtype == torch.bfloat16 else None
        apply_update_(expect, update, g, 0.01, weight_decay, gen)
        noise = None
        if gen is not None:  # the reference's draw: one chunk, randint(0, 2^16) of the weight's shape
            noise = torch.randint(0, 1 << 16, SHAPE, generator=torch.Generator(kernel_device).manual_seed(11),
                                  device=kernel_device, dtype=torch.int32)
        float_update_triton_(got, update, g, 0.01, weight_decay, seed=None, noise=noise)
        assert torch.equal(got, expect), (kind, sr)
        assert not torch.equal(got, w)


def test_philox_rounding_is_seeded_and_unbiased(kernel_device):
    w = torch.full((64, 256), 1.0, dtype=torch.bfloat16, device=kernel_device)  # bf16 ulp at 1.0: 2^-7
    g = torch.ones_like(w, dtype=torch.float32)
    step = 0.3 * 2**-7  # 0.3 ulp below 1.0 (ulp 2^-8 there): SR lands on 1 - 2^-8 with probability 0.6
    update = Update(grad_scale=torch.tensor(step, device=kernel_device))
    runs = {}
    for seed in (1, 1, 2):
        out = w.clone()
        float_update_triton_(out, update, g, 1.0, 0.0, seed=seed)
        runs.setdefault(seed, []).append(out)
    assert torch.equal(*runs[1]) and not torch.equal(runs[1][0], runs[2][0])
    mean = runs[1][0].float().mean().item()
    assert abs(mean - (1.0 - step)) < 4 * (0.5 * 2**-8) / 128  # ~ four standard errors over 16384 draws


def test_dispatcher_keeps_the_cpu_path_and_refuses_what_the_kernel_cannot_take():
    w, update, g = _case("tensor", torch.bfloat16, "cpu")
    a, b = w.clone(), w.clone()
    float_update_(a, update, g, 0.01, 0.0, seed=5)  # auto on CPU: the reference with a seeded generator
    apply_update_(b, update, g, 0.01, 0.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    if triton_kernels.interpret_mode():
        c = w.clone()
        float_update_(c, update, g, 0.01, 0.0, seed=5, backend="triton")  # the kernel, in the interpreter
        assert (c.float() - b.float()).abs().max() <= 2 * 2**-8 * b.float().abs().max()  # other random bits
    with pytest.raises(ValueError, match="must be contiguous"):
        float_update_(w.t(), Update(grad_scale=update.grad_scale), g.t(), 0.01, 0.0, 5, backend="triton")
