"""Int8Linear: a Linear layer that stores only group-wise int8 codes (no float master weight).

Forward dequantizes to the compute dtype; backward returns dX and hands dW straight to a grad sink
(the layer-wise release hook) instead of keeping a .grad: integer tensors cannot hold one (docs/algorithms.md §12).
For inference (evaluation, sampling), `dequantized_weights` dequantizes each layer once for many forwards.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from qtrain.quant import dispatch
from qtrain.quant.groupwise import num_groups, quantize_groupwise

GradSink = Callable[["Int8Linear", Tensor], None]


def compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# x -> (x._version, x in the compute dtype), while x lives: the projections that read one input share its cast
_casts = WeakIdKeyDictionary()


def shared_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x.to(dtype), cast once for every projection that reads this very x: q/k/v read one normalised fp32
    hidden state under bf16 autocast (gate/up another), so 3 (2) casts become one, and one bf16 copy is saved
    for their backward instead of 3 (2). The same bits as x.to(dtype); an in-place write to x (a new _version)
    casts again. The cache holds x weakly: its entry goes with x."""
    if x.dtype == dtype:
        return x
    kept = _casts.get(x)
    if kept is not None and kept[0] == x._version and kept[1].dtype == dtype:
        return kept[1]
    y = x.to(dtype)
    _casts[x] = (x._version, y)
    return y


class _Int8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, layer: "Int8Linear") -> Tensor:
        x = shared_cast(x, compute_dtype(x))
        ctx.layer = layer
        ctx.save_for_backward(x)  # the codes are NOT saved: the release hook rewrites them in place
        return layer.matmul_x(x)  # (B, T, in) -> (B, T, out)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,) = ctx.saved_tensors
        layer: Int8Linear = ctx.layer
        # Ŵ again (dequantized or fused) rather than kept alive from forward: one weight-sized transient at a
        # time; this layer's codes have not been updated yet in this backward.
        dx = layer.matmul_grad_input(dy) if ctx.needs_input_grad[0] else None  # (B, T, in)
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)  # (out, in)
        layer.receive_grad(dw)
        return dx, None, None


class Int8Linear(nn.Module):
    """y = x Ŵᵀ (+ b) with Ŵ = codes * scale + offset per group of `group_size` consecutive weights.

    The optional bias (Qwen2's q/k/v) is an ordinary float Parameter: the float optimizer trains it.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 meta_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = num_groups((out_features, in_features), group_size)
        self.register_buffer("codes", torch.zeros((out_features, in_features), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(G, dtype=meta_dtype, device=device))
        self.register_buffer("offset", torch.zeros(G, dtype=meta_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.weight_grad: Tensor | None = None  # accumulated dW when no sink is attached
        self.grad_sink: GradSink | None = None
        self.kernels = "auto"  # dequantize backend ("auto" | "torch" | "triton"), set from [quant] kernels
        self.matmul = "dequantize"  # "dequantize" then GEMM, or the "fused" dequant-GEMM: [quant] matmul
        self.inference_weight: Tensor | None = None  # Ŵ held by dequantized_weights(), used only under no_grad
        # Autograd calls backward only if some input requires grad; without this anchor the first
        # layer (input from a frozen embedding, or raw features) would never see its dW.
        self._anchor = torch.empty(0, requires_grad=True)

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int, meta_dtype: torch.dtype = torch.float32) -> "Int8Linear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, meta_dtype, device=weight.device)
        layer.load_float_(weight)
        return layer

    @torch.no_grad()
    def load_float_(self, weight: Tensor) -> None:
        """Nearest-rounding quantization of a float weight (initialisation only)."""
        codes, scale, offset = quantize_groupwise(weight, self.group_size, self.scale.dtype)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        self.offset.copy_(offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ (out, in) in dtype: one Triton kernel on CUDA, bit-identical to the torch reference."""
        return dispatch.dequantize(self.codes, self.scale, self.offset, self.group_size, dtype, self.kernels)

    def matmul_x(self, x: Tensor) -> Tensor:
        """x Ŵᵀ in x.dtype: (..., in) -> (..., out)."""
        return dispatch.linear(x, self.codes, self.scale, self.offset, self.group_size, self.kernels, self.matmul)

    def matmul_grad_input(self, dy: Tensor) -> Tensor:
        """dy Ŵ in dy.dtype: (..., out) -> (..., in)."""
        return dispatch.linear_grad_input(dy, self.codes, self.scale, self.offset, self.group_size, self.kernels,
                                          self.matmul)

    def receive_grad(self, dw: Tensor) -> None:
        if self.grad_sink is not None:
            self.grad_sink(self, dw)
        elif self.weight_grad is None:
            self.weight_grad = dw
        else:  # gradient accumulation (non-release mode): the running sum in fp32, like a float .grad,
            # so k micro-batches of bf16 dW are not rounded to bf16 at every addition
            self.weight_grad = self.weight_grad.float().add_(dw)

    def forward(self, x: Tensor) -> Tensor:
        w = self.inference_weight
        if w is not None and not torch.is_grad_enabled():  # inference: the held Ŵ, the same GEMM as dispatch.linear
            x = shared_cast(x, compute_dtype(x))
            y = F.linear(x.reshape(-1, x.shape[-1]), w.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self._anchor.device != x.device:  # on the activations' device: a CPU anchor beside CUDA tensors would
            self._anchor = torch.empty(0, device=x.device, requires_grad=True)  # hand every backward to the CPU thread
        y = _Int8LinearFn.apply(x, self._anchor, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # in the compute dtype, as nn.Linear

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"meta={self.scale.dtype}, matmul={self.matmul}, bias={self.bias is not None}")


@contextlib.contextmanager
def dequantized_weights(model: nn.Module, dtype: torch.dtype, budget_bytes: int) -> Iterator[int]:
    """Inference inside: each Int8Linear's Ŵ in dtype is dequantized once on entry and dropped on exit.

    Without it every forward dequantizes every projection again (sampling: once per new token). Layers are
    taken in module order until budget_bytes of dequantized weights is spent; the rest dequantize per forward
    as usual (memory stays bounded on a model too large to hold twice). Only plain Int8Linear layers (an FSDP2
    shard holds a part of its rows). The codes must not change inside (no training step): yields the number
    of layers held.
    """
    held = []
    for layer in model.modules():
        nbytes = layer.out_features * layer.in_features * dtype.itemsize if type(layer) is Int8Linear else 0
        if nbytes and nbytes <= budget_bytes:
            layer.inference_weight = layer.dequantize(dtype)
            budget_bytes -= nbytes
            held.append(layer)
    try:
        yield len(held)
    finally:
        for layer in held:
            layer.inference_weight = None
