"""Peak transient memory of one int8 weight's update, measured from the profiler's allocation events.

Documented (docs/performance.md "Memory of one int8 update"): the release hook for an int8 weight holds, besides the
optimizer state, three fp32 buffers the size of one chunk of rows (the dequantized rows / grid
positions, the uniforms, their floor) — chunks are at most 2^22 elements, so at most 48 MiB — plus,
for a bf16 gradient, its fp32 copy while the direction is computed (before the chunks run).
"""

import torch
from torch import nn

from qtrain.core.memory_probe import cpu_peak_bytes
from qtrain.optim import Apollo, apollo_mini
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.quant.groupwise import quantize_groupwise
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.linear import Int8Linear
from qtrain.update.updater import Updater

M, N = 512, 1024
FP32_BYTES = M * N * torch.float32.itemsize


def _hook_peak(method) -> int:
    layer = Int8Linear.from_float(torch.randn(M, N) * 0.02, 128)
    model = nn.Sequential()
    model.add_module("q_proj", layer)
    updater = Updater(model, method, float_optimizer_factory("adamw"))
    grad = torch.randn(M, N)
    updater.begin_step(0.01)
    updater.update_int8(layer, grad)  # first call allocates the optimizer state
    updater.begin_step(0.01)
    peak, net = cpu_peak_bytes(lambda: updater.update_int8(layer, grad))
    assert net == 0  # nothing kept: the state is reused in place
    return peak


def test_int8_update_transient_is_three_fp32_chunks():
    for method in (apollo_mini(), Apollo(rank=8)):
        peak = _hook_peak(method)
        print(f"{type(method).__name__} rank {method.rank}: peak transient {peak} B = {peak / FP32_BYTES:.3f} x fp32 weight")
        assert 3 * FP32_BYTES <= peak <= 3 * FP32_BYTES + 64 * 1024


def test_chunking_bounds_the_transient():
    codes, scale, offset = quantize_groupwise(torch.randn(M, N) * 0.02, 128)
    grad = torch.randn(M, N)
    chunk = 64 * N  # 64 rows per chunk
    gen = torch.Generator().manual_seed(0)
    peak, _ = cpu_peak_bytes(
        lambda: int8_scaled_update_(codes, scale, offset, 128, grad, torch.ones(()), 0.01, 0.0, gen, chunk)
    )
    assert 3 * chunk * 4 <= peak <= 3 * chunk * 4 + 16 * 1024  # 8x smaller than the unchunked update
