"""Choose between the Triton kernels and their plain-torch references for int8 weights.

backend="auto": Triton when every tensor is on CUDA and Triton is installed and supports the layout
(power-of-two group size, fp32 or bf16 scales), else the torch reference. "torch" and "triton" force one;
"triton" on CPU tensors runs only in Triton's interpreter (TRITON_INTERPRET=1, for tests).
Both backends draw the SR uniforms from one integer seed per (run, tensor, step), see qtrain.core.seeding.update_seed, but
from different generators (torch's Philox/mt19937 vs Triton's tl.rand): their codes agree in
distribution, not bitwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qtrain.core.seeding import mix_seed
from qtrain.core.step_state import StepValue, device_form, host_form
from qtrain.errors import ConfigError
from qtrain.quant import triton_kernels, triton_matmul
from qtrain.quant.groupwise import dequantize_groupwise, dequantize_groupwise_bytes
from qtrain.quant.int8_update import int8_scaled_update_ as int8_scaled_update_torch_
from qtrain.quant.int8_update import int8_scaled_update_bytes
from qtrain.quant.stochastic_round import skip_uniforms

BACKENDS = ("auto", "torch", "triton")
MATMULS = ("dequantize", "fused")


def use_triton(backend: str, tensors: tuple[Tensor, ...], problems: list[str], what: str) -> bool:
    """The backend convention of every Triton kernel with a torch twin (these int8 kernels, APOLLO's
    statistics in qtrain.optim.apollo_kernels): True to run the kernel, False for the torch reference.

    problems: why the kernel cannot take these tensors (empty if it can). "auto" takes Triton only for
    CUDA tensors without problems; "triton" raises naming the problem, or the device outside the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}; allowed: {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and not problems  # e.g. a group size that is not a power of two: the reference takes it
    if problems:
        raise ConfigError([f"{what} cannot run in Triton: " + "; ".join(problems) + ". Use backend='torch' "
                           "([quant] kernels = \"torch\" or \"auto\" in a recipe)."], source="[quant] kernels")
    if not on_cuda and not triton_kernels.interpret_mode():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got tensors on {devices}; use backend='torch' (or 'auto') "
            f"on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (tests only)"
        )
    return True


def _use_triton(backend: str, tensors: tuple[Tensor, ...], codes: Tensor, scale: Tensor, offset: Tensor,
                group_size: int) -> bool:
    problems = []
    if backend == "auto" and not all(t.is_cuda for t in tensors):
        return False  # CPU: the reference, without the layout checks (they run on every call)
    if backend in ("auto", "triton"):
        try:
            triton_kernels.check_supported(codes, scale, offset, group_size)
        except ValueError as e:
            if backend == "triton":  # its own message already names every problem and the fix
                raise ConfigError([str(e)], source="[quant] kernels") from None
            problems = [str(e)]
    return use_triton(backend, tensors, problems, "the int8 kernels")


def _use_fused_matmul(matmul: str, backend: str, a: Tensor, codes: Tensor, scale: Tensor, offset: Tensor,
                      group_size: int) -> bool:
    """The fused dequant-GEMM where asked for and the kernels run; else dequantize, then matmul.

    a: the 2-D activation. backend "auto" falls back quietly (CPU, or a layout the kernel does not take), and
    also where the fused kernel is known to lose (triton_matmul.fused_expected_faster: gathered scales, few
    rows); "triton" runs it wherever it can and says why not.
    """
    if matmul not in MATMULS:
        raise ValueError(f"matmul = {matmul!r}; allowed: {MATMULS}")
    if matmul == "dequantize" or not _use_triton(backend, (a, codes, scale, offset), codes, scale, offset,
                                                   group_size):
        return False
    if backend == "auto":
        try:
            triton_matmul.check_supported(a, codes, scale, offset, group_size)
        except ValueError:
            return False
        return triton_matmul.fused_expected_faster(a.shape[0], codes.shape[1], group_size)
    return True


class KernelPlan(NamedTuple):
    """What this module's functions choose for one int8 weight (`plan`): the estimator's question."""

    triton: bool  # dequantize and int8_scaled_update_ run the Triton kernels (else the torch references)
    fused_matmul: bool  # linear and linear_grad_input run the fused dequant-GEMM: no dequantized weight exists

    def dequantize_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Peak bytes of `dequantize` into dtype, the result included (0 where the fused matmul needs none)."""
        numel = shape[0] * shape[1]
        if self.fused_matmul:
            return 0
        return dtype.itemsize * numel if self.triton else dequantize_groupwise_bytes(numel, dtype)

    def update_bytes(self, shape: tuple[int, int], group_size: int, stochastic: bool) -> int:
        """Transient bytes of `int8_scaled_update_` (SR in place in Triton; nearest rounding runs the reference)."""
        if self.triton and stochastic:
            return 0
        return int8_scaled_update_bytes(shape, group_size, stochastic)


def plan(backend: str, matmul: str, device_type: str, codes: Tensor, scale: Tensor, offset: Tensor,
         group_size: int, rows: int, dtype: torch.dtype) -> KernelPlan:
    """The choices of `dequantize`, `int8_scaled_update_` and `linear` for this weight on a `device_type` device,
    with `rows` activation rows in dtype, by the rules those functions apply to real tensors (these may be on
    meta; Triton is taken as installed on CUDA, where torch's wheels ship it). Nothing runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}; allowed: {BACKENDS}")
    if device_type != "cuda" or backend == "torch":
        return KernelPlan(False, False)
    triton = not triton_kernels.int8_kernel_problems(codes, scale, offset, group_size, need_triton=False)
    a = torch.empty((rows, codes.shape[1]), dtype=dtype, device="meta")  # the activation's layout, no memory
    fused = (matmul == "fused" and triton
             and not triton_matmul.fused_problems(a, codes, scale, offset, group_size, need_triton=False)
             and (backend != "auto" or triton_matmul.fused_expected_faster(rows, codes.shape[1], group_size)))
    return KernelPlan(triton, fused)


def linear(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, backend: str = "auto",
           matmul: str = "dequantize") -> Tensor:
    """y = x Ŵᵀ: x (..., K) -> (..., N) in x.dtype, Ŵ the int8 weight (N, K) dequantized to x.dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if _use_fused_matmul(matmul, backend, x2, codes, scale, offset, group_size):
        y = triton_matmul.int8_matmul_triton(x2, codes, scale, offset, group_size)
    else:
        y = F.linear(x2, dequantize(codes, scale, offset, group_size, x.dtype, backend))
    return y.reshape(*x.shape[:-1], codes.shape[0])


def linear_grad_input(dy: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int,
                      backend: str = "auto", matmul: str = "dequantize") -> Tensor:
    """dx = dy Ŵ: dy (..., N) -> (..., K) in dy.dtype, the input gradient of `linear`."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
    if _use_fused_matmul(matmul, backend, dy2, codes, scale, offset, group_size):
        dx = triton_matmul.int8_matmul_grad_input_triton(dy2, codes, scale, offset, group_size)
    else:
        dx = dy2 @ dequantize(codes, scale, offset, group_size, dy.dtype, backend)
    return dx.reshape(*dy.shape[:-1], codes.shape[1])


def dequantize(
    codes: Tensor, scale: Tensor, offset: Tensor, group_size: int, dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor:
    """codes uint8 (m, n), scale/offset (G,) -> weights (m, n) in dtype; both backends bit-identical."""
    if _use_triton(backend, (codes, scale, offset), codes, scale, offset, group_size):
        return triton_kernels.dequantize_triton(codes, scale, offset, group_size, dtype, checked=True)
    return dequantize_groupwise(codes, scale, offset, group_size, dtype)


def int8_scaled_update_(
    codes: Tensor,
    scale: Tensor,
    offset: Tensor,
    group_size: int,
    grad: Tensor,
    grad_scale: Tensor,
    lr: float | Tensor | StepValue,
    weight_decay: float,
    generator_seed: int | StepValue,
    backend: str = "auto",
    first_row: int = 0,
) -> None:
    """In place: W <- SR((W - lr * grad_scale * grad) * (1 - lr * wd)); see int8_update.int8_scaled_update_.

    generator_seed in [0, 2^31) (update_seed): the Philox key of the Triton kernel, or the seed of a fresh
    torch.Generator on the weight's device for the reference. lr: a float, or a 0-dim tensor on the weight's
    device (the Triton kernel reads it on the device, the reference uses it as a tensor operand).
    A StepValue (lr or seed) gives the kernel its device tensor (capturable) and the reference its host number
    (the CPU numbers of a float lr and a seeded generator).
    first_row: the row of the whole weight where these codes start (FSDP2 updates one row shard). The reference
    skips the noise of the rows before it, so a shard rounds exactly like the same rows of the whole weight; the
    Triton kernel's counter-based noise takes a seed mixed with first_row instead (the same distribution).
    """
    tensors = (codes, scale, offset, grad, grad_scale) + tuple(
        t for t in (device_form(lr), device_form(generator_seed)) if isinstance(t, Tensor))
    if _use_triton(backend, tensors, codes, scale, offset, group_size):
        if first_row:
            generator_seed = mix_seed(host_form(generator_seed), first_row) >> 32
        triton_kernels.int8_scaled_update_triton_(
            codes, scale, offset, group_size, grad, grad_scale, device_form(lr), weight_decay, device_form(generator_seed),
            checked=True,
        )  # _use_triton ran check_supported: once per launch, not twice
        return
    generator = torch.Generator(codes.device).manual_seed(host_form(generator_seed))
    skip_uniforms(generator, first_row * codes.shape[1], codes.device)
    int8_scaled_update_torch_(codes, scale, offset, group_size, grad, grad_scale, host_form(lr), weight_decay, generator)

