"""Int8Weight: an int8 projection's codes, scales and offsets as one tensor that FSDP2 can shard (qtrain.parallel.fsdp).

To FSDP2 and autograd it looks like a float (out, in) parameter; inside it holds the uint8 codes and the
per-group meta. FSDP2 shards it by dim 0 (rows: qtrain's groups lie inside rows when in_features is a multiple
of the group size, so a row shard never cuts a group), all-gathers the int8 pieces as bytes for compute
(`fsdp_pre_all_gather` / `fsdp_post_all_gather`, the extension point torchao's int8 training weight uses), and
reduce-scatters the dW the layer's backward returns as the weight's gradient. ShardedInt8Linear is the
Int8Linear that reads its codes from such a weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from qtrain.quant.linear import Int8Linear, compute_dtype

aten = torch.ops.aten


class Int8Weight(Tensor):
    """An int8 weight (codes uint8 (m, n), scale/offset (G,)) that presents itself as an fp32 (m, n) tensor.

    Only the operations FSDP2 applies to a parameter are implemented (chunk, narrow, new_zeros, copy_, view,
    as_strided, detach, alias); any other operation raises, so a dequantization can never happen by accident.
    """

    codes: Tensor
    scale: Tensor
    offset: Tensor
    group_size: int

    @staticmethod
    def __new__(cls, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int,
                dtype: torch.dtype = torch.float32):
        return Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor, group_size: int,
                 dtype: torch.dtype = torch.float32):
        """dtype: what the weight looks like, the model's float dtype (FSDP2 wants one dtype per unit); its
        gradient has it too."""
        self.codes, self.scale, self.offset, self.group_size = codes, scale, offset, group_size

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, group_size={self.group_size}, meta={self.scale.dtype})"

    def __tensor_flatten__(self):
        return ["codes", "scale", "offset"], (self.group_size, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Int8Weight(inner["codes"], inner["scale"], inner["offset"], *meta)

    def _groups(self, r0: int, r1: int) -> slice:
        """The groups of rows r0..r1 (a shard never cuts a group: `problems` checks the shapes)."""
        n = self.codes.shape[1] if self.codes.dim() == 2 else 1
        g0, g1 = r0 * n, r1 * n
        if g0 % self.group_size or g1 % self.group_size:
            raise ValueError(f"rows {r0}:{r1} of a {tuple(self.codes.shape)} int8 weight cut a group of "
                             f"{self.group_size}")
        return slice(g0 // self.group_size, g1 // self.group_size)

    def rows(self, r0: int, r1: int) -> Int8Weight:
        """Rows r0..r1 (views of codes, scale and offset)."""
        gs = self._groups(r0, r1)
        return Int8Weight(self.codes[r0:r1], self.scale[gs], self.offset[gs], self.group_size, self.dtype)

    # ---- FSDP2's all-gather extension ----------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        return (self.codes, self.scale, self.offset), (self.group_size, self.dtype)  # as bytes, not dequantized

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        codes, scale, offset = outputs
        if out is not None:  # a later gather into the same (re-allocated) buffers: nothing to rebuild
            return
        return Int8Weight(codes, scale, offset, *metadata), (codes, scale, offset)

    # ---- the operations FSDP2 and autograd apply to a parameter ----------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(f"Int8Weight does not support {func}: an int8 weight is read only through "
                                      f"its codes, scale and offset")
        return handler(*args, **kwargs)


def _same(w: Int8Weight, codes: Tensor, scale: Tensor, offset: Tensor) -> Int8Weight:
    return Int8Weight(codes, scale, offset, w.group_size, w.dtype)


def _split(w: Int8Weight, split_size: int, dim: int = 0):
    if dim != 0:
        raise NotImplementedError("Int8Weight splits only by rows (dim 0)")
    m = w.shape[0]
    return [w.rows(r0, min(m, r0 + split_size)) for r0 in range(0, m, split_size)]


def _slice(w: Int8Weight, dim: int = 0, start=None, end=None, step: int = 1):
    if dim != 0 or step != 1:
        raise NotImplementedError("Int8Weight slices only contiguous rows (dim 0)")
    m = w.shape[0]
    start = 0 if start is None else max(0, min(m, start if start >= 0 else start + m))
    end = m if end is None else max(start, min(m, end if end >= 0 else end + m))
    return w.rows(start, end)


def _new_zeros(w: Int8Weight, size, **kwargs):
    size = tuple(size)
    if size[1:] != tuple(w.shape[1:]):
        raise NotImplementedError(f"Int8Weight.new_zeros{size} changes the row width of {tuple(w.shape)}")
    numel = size[0] * (size[1] if len(size) > 1 else 1)
    G = numel // w.group_size
    codes = torch.zeros(size, dtype=torch.uint8, device=w.device)
    return _same(w, codes, w.scale.new_ones(G), w.offset.new_zeros(G))


def _copy_(dst: Int8Weight, src, non_blocking: bool = False):
    if not isinstance(src, Int8Weight):
        raise NotImplementedError("Int8Weight.copy_ takes another Int8Weight (a float copy would need quantization)")
    dst.codes.copy_(src.codes)
    dst.scale.copy_(src.scale)
    dst.offset.copy_(src.offset)
    return dst


def _view(w: Int8Weight, size):
    size = list(size)
    if -1 in size:
        known = 1
        for s in size:
            known *= s if s != -1 else 1
        size[size.index(-1)] = w.numel() // known
    if tuple(size) == tuple(w.shape):
        return _same(w, w.codes, w.scale, w.offset)
    return _same(w, w.codes.view(size), w.scale, w.offset)  # FSDP2's flat view of the padded shard


def _as_strided(w: Int8Weight, size, stride, storage_offset=0):
    if tuple(size) != tuple(w.shape) or (storage_offset or 0) != 0:
        raise NotImplementedError(f"Int8Weight.as_strided to {tuple(size)} from {tuple(w.shape)}")
    return _same(w, w.codes, w.scale, w.offset)


def _to_copy(w: Int8Weight, *, dtype=None, device=None, **kwargs):
    if dtype not in (None, w.dtype):
        raise NotImplementedError(f"Int8Weight cannot become {dtype}: it is read only through its codes")
    device = w.device if device is None else device  # FSDP2 moves a CPU-built model to the mesh's device
    return _same(w, w.codes.to(device), w.scale.to(device), w.offset.to(device))


def _empty_like(w: Int8Weight, *, dtype=None, device=None, **kwargs):
    """Uninitialised storage of the same layout (Module.to_empty: a model sharded on the meta device gets its
    shards' memory, then each rank fills its rows)."""
    if dtype not in (None, w.dtype):
        raise NotImplementedError(f"Int8Weight cannot become {dtype}: it is read only through its codes")
    device = w.device if device is None else device
    return _same(w, torch.empty_like(w.codes, device=device), torch.empty_like(w.scale, device=device),
                 torch.empty_like(w.offset, device=device))


def _detach(w: Int8Weight):
    return _same(w, w.codes.detach(), w.scale.detach(), w.offset.detach())


def _is_same_size(a, b):
    return tuple(a.shape) == tuple(b.shape)


_HANDLERS = {
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.detach.default: _detach,
    aten.empty_like.default: _empty_like,
    aten.alias.default: _detach,
    aten.is_same_size.default: _is_same_size,
}


# ---- the layer -----------------------------------------------------------------------------------------
def local_tensor(t: Tensor) -> Tensor:
    """The tensor a rank holds: a DTensor's local shard, anything else as is."""
    return t._local_tensor if isinstance(t, DTensor) else t


class _ShardedInt8LinearFn(torch.autograd.Function):
    """_Int8LinearFn with the weight as an autograd input: dW is its gradient, which FSDP2 reduce-scatters."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, layer: ShardedInt8Linear) -> Tensor:
        x = x.to(compute_dtype(x))
        ctx.layer = layer
        ctx.save_for_backward(x)  # not the weight: FSDP2 frees the gathered codes after forward
        return layer.matmul_x(x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer  # its weight is the one FSDP2 gathered again for backward
        dx = layer.matmul_grad_input(dy) if ctx.needs_input_grad[0] else None
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)  # (out, in)
        return dx, dw.to(weight_dtype(layer)), None  # the weight's apparent dtype: reduce-scattered in it


class ShardedInt8Linear(Int8Linear):
    """An Int8Linear whose codes, scale and offset live in one Int8Weight parameter, `weight`, that FSDP2
    manages: the gathered weight during forward and backward, the local rows otherwise."""

    @property
    def codes(self) -> Tensor:
        return local_tensor(self.weight).codes

    @property
    def scale(self) -> Tensor:
        return local_tensor(self.weight).scale

    @property
    def offset(self) -> Tensor:
        return local_tensor(self.weight).offset

    def forward(self, x: Tensor) -> Tensor:
        y = _ShardedInt8LinearFn.apply(x, self.weight, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def weight_dtype(layer: Int8Linear) -> torch.dtype:
    return local_tensor(layer.weight).dtype


def to_sharded_layer(layer: Int8Linear, dtype: torch.dtype) -> None:
    w = Int8Weight(layer.codes, layer.scale, layer.offset, layer.group_size, dtype)
    for key in ("codes", "scale", "offset"):
        del layer._buffers[key]
    layer.__class__ = ShardedInt8Linear
    layer.weight = nn.Parameter(w, requires_grad=True)
