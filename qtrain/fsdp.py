"""FSDP2 (torch.distributed.fsdp.fully_shard) for qtrain models: int8 weights sharded by rows.

Each int8 projection's codes, scales and offsets become one `Int8Weight`: a tensor subclass that looks like an
fp32 (out, in) parameter to FSDP2 and autograd, and holds the uint8 codes and per-group meta inside. FSDP2
shards it by dim 0 (rows; qtrain's groups lie inside rows when in_features is a multiple of the group size, and
a shard boundary always falls between groups), all-gathers the int8 pieces for compute (`fsdp_pre_all_gather`
/ `fsdp_post_all_gather`, the way torchao's int8 training weight does), reduce-scatters the dW (fp32) that the
layer's backward returns, and calls the post-accumulate-grad hook on the sharded parameter. That hook runs
the update on the local rows only. Float tensors (embedding, norms, lm_head) are ordinary FSDP2 parameters,
updated in the same hook on their local shard.

Why a sharded update equals the unsharded one:
  - the reduce-scatter is a SUM (the loss is scaled by 1/world before backward, as in data parallel);
  - Adam is elementwise, so a shard's update is the full update's rows;
  - APOLLO's statistics live on the columns of the oriented gradient Ĝ. Every rank owns a block of Ĝ's
    columns: its own rows of G when Ĝ = Gᵀ (m >= n), or a column block fetched with one all-to-all of its
    gradient shard when Ĝ = G (m < n). R = PᵀĜ, the column norms and the moments of those columns are then
    computed locally with the unsharded arithmetic (`_project_block`); N, R and the column norms are
    all-gathered, and every norm (APOLLO-Mini's ‖N‖, ‖R‖, ‖Ĝ‖; APOLLO's per-column ratios and ‖Ĝ·Diag(s)‖)
    is taken of those unsharded tensors;
  - stochastic rounding on the CPU draws one number per element, in row-major order, from the tensor's
    generator: a shard skips the draws of the rows before it and rounds exactly like the same rows of the full
    tensor. On CUDA (Triton's counter-based noise) a shard's seed is mixed with its first row instead: the
    same distribution, not the single-GPU bits.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from qtrain.build import build_updater
from qtrain.errors import TrainingError
from qtrain.int8_linear import Int8Linear, compute_dtype
from qtrain.model import float_parameters, int8_layers
from qtrain.optim.apollo import project_with_column_norms
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.projection import random_projection
from qtrain.quant import dispatch
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.stochastic_round import UNIFORM_BITS
from qtrain.seeding import mix_seed, name_uid, update_seed

aten = torch.ops.aten
MOMENTS = ("exp_avg", "exp_avg_sq")  # APOLLO's projected moments (r x b): sharded by columns
BLOCK_STATISTICS = ("absmax1", "absmax2")  # bitsandbytes' 8-bit Adam: one absmax per block of its flat state
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # its block size, and the size below which a tensor keeps 32-bit state
# apollo.project_with_column_norms' chunk (its default): the unsharded update's chunk rows
APOLLO_CHUNK = inspect.signature(project_with_column_norms).parameters["max_chunk_elems"].default


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
    aten.alias.default: _detach,
    aten.is_same_size.default: _is_same_size,
}


# ---- the layer -----------------------------------------------------------------------------------------
def _local(t: Tensor) -> Tensor:
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
        return _local(self.weight).codes

    @property
    def scale(self) -> Tensor:
        return _local(self.weight).scale

    @property
    def offset(self) -> Tensor:
        return _local(self.weight).offset

    def forward(self, x: Tensor) -> Tensor:
        y = _ShardedInt8LinearFn.apply(x, self.weight, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def weight_dtype(layer: Int8Linear) -> torch.dtype:
    return _local(layer.weight).dtype


def _to_sharded_layer(layer: Int8Linear, dtype: torch.dtype) -> None:
    w = Int8Weight(layer.codes, layer.scale, layer.offset, layer.group_size, dtype)
    for key in ("codes", "scale", "offset"):
        del layer._buffers[key]
    layer.__class__ = ShardedInt8Linear
    layer.weight = nn.Parameter(w, requires_grad=True)


# ---- what is supported -----------------------------------------------------------------------------------
def problems(cfg, model: nn.Module, world_size: int) -> list[str]:
    """Why this recipe cannot train under FSDP2 on world_size ranks (empty: it can), each with the fix."""
    t, o = cfg.train, cfg.optim
    out = []
    if o.method not in ("apollo", "apollo_mini"):
        out.append(f'[optim] method = "{o.method}": FSDP2 shards APOLLO and APOLLO-Mini only (their statistics are '
                   f'reduced across shards); use method = "apollo_mini" or "apollo", or drop --fsdp')
    elif o.args.get("official_seed_chain"):
        out.append("[optim.args] official_seed_chain = true is not supported with FSDP2; remove it")
    if not t.release:
        out.append("[train] release = false: FSDP2 updates each shard inside backward (layer-wise release); set "
                   "train.release = true and grad_accum_steps = 1")
    if getattr(t, "cuda_graph", False):
        out.append("[train] cuda_graph = true is not supported with FSDP2; set it to false")
    if o.float_grad_clip > 0:
        out.append("[optim] float_grad_clip > 0 clips by a tensor's norm, which a shard does not know; set it to 0")
    if o.lm_head_optimizer != "adam" or o.embedding_optimizer != "adam":
        out.append('[optim] lm_head_optimizer / embedding_optimizer = "same_as_matrices" is not supported with '
                   'FSDP2; set both to "adam"')
    if o.float_optimizer == "adam8bit":  # blockwise state: a shard must hold whole blocks, and stay 8-bit
        for name, p in float_parameters(model).items():
            local = -(-p.shape[0] // world_size) * (p.numel() // max(p.shape[0], 1))
            if p.dim() == 2 and (p.shape[0] % world_size or local % BNB_BLOCK
                                 or (p.numel() >= BNB_MIN_8BIT) != (local >= BNB_MIN_8BIT)):
                out.append(f'{name} {tuple(p.shape)}: 8-bit Adam\'s blocks of {BNB_BLOCK} would straddle its '
                           f'{world_size} row shards; set optim.float_optimizer = "adamw"')
                break
    if cfg.model.tie_embeddings:
        out.append("[model] tie_embeddings = true is not supported with FSDP2 (one tensor in two units); set it "
                   "to false")
    if not cfg.quant.enabled:
        out.append("[quant] enabled = false: FSDP2 here shards int8 projections; set quant.enabled = true")
    for name, layer in int8_layers(model).items():
        m, n = layer.out_features, layer.in_features
        if m % world_size or (m // world_size * n) % layer.group_size:
            out.append(f"{name} ({m} x {n}): FSDP2 shards rows evenly and whole groups of {layer.group_size}; "
                       f"out_features must be a multiple of the world size {world_size} (and each shard a whole "
                       f"number of groups): use a world size that divides {m}")
            break
        if m < n and n % world_size:
            out.append(f"{name} ({m} x {n}): APOLLO's column blocks need in_features divisible by the world size "
                       f"{world_size}")
            break
    return out


# ---- sharded APOLLO -------------------------------------------------------------------------------------
def _gather_columns(pieces: list[Tensor], group=None) -> list[Tensor]:
    """Every rank's pieces (each (rows, k) or (k,)) concatenated along their last dim in rank order, with one
    all-gather for all of them: the unsharded tensors, bit for bit."""
    flat = torch.cat([p.reshape(-1) for p in pieces])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    out, at = [], 0
    for p in pieces:
        n = p.numel()
        out.append(torch.cat([g[at:at + n].view(p.shape) for g in gathered], dim=-1))
        at += n
    return out


def _column_block(grad: Tensor, shape: tuple[int, int], world: int, group=None) -> Tensor:
    """This rank's block of columns of the oriented gradient Ĝ (a × b/world), from its rows of G.

    Ĝ = Gᵀ (m >= n): the local rows of G are columns of Ĝ already. Ĝ = G (m < n): one all-to-all swaps
    row blocks for column blocks (each rank sends 1/world of its shard to each other rank).
    """
    m, n = shape
    if m >= n:
        return grad.t()  # (n, m_local), a view: the strides Ĝ = Gᵀ has in the unsharded update
    rows, k = grad.shape[0], n // world
    send = grad.reshape(rows, world, k).transpose(0, 1).contiguous()  # (world, rows, k): block j goes to rank j
    recv = torch.empty_like(send)  # from rank j: its rows, my columns
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(m, k)


def _project_block(proj: Tensor, g_hat: Tensor, b: int, c0: int) -> tuple[Tensor, Tensor]:
    """apollo.project_with_column_norms for the columns c0.. of an oriented gradient b wide: R's and the column
    norms' columns, bit for bit.

    The same chunk rows as the unsharded call. A column of R (one dot product per output, MKL's GEMM) does
    not depend on the other columns. The column norms of a row-contiguous chunk do: torch's CPU sum over
    dim 0 vectorizes across columns by their position in the row, so a block that is not a whole number of
    vectors would sum its last columns in another order. It is summed at its place in a zero row as wide as
    the unsharded one (one chunk-sized buffer).
    """
    a, b_local = g_hat.shape
    rows = max(1, APOLLO_CHUNK // b)
    r = torch.zeros((proj.shape[1], b_local), device=g_hat.device, dtype=torch.float32)
    col_sq = torch.zeros(b_local, device=g_hat.device, dtype=torch.float32)
    for i in range(0, a, rows):
        chunk = g_hat[i : i + rows].float()  # (rows, b_local)
        r.addmm_(proj[i : i + rows].t(), chunk)
        if chunk.stride(-1) == 1 and b_local != b and chunk.device.type == "cpu":  # (CUDA: not bit-matched anyway)
            wide = chunk.new_zeros((chunk.shape[0], b))
            wide[:, c0 : c0 + b_local] = chunk
            col_sq.add_(wide.square_().sum(dim=0)[c0 : c0 + b_local])
            del wide
        else:  # Ĝ = Gᵀ: each column is contiguous and reduced on its own
            col_sq.add_(chunk.square().sum(dim=0))
    return r, col_sq


def sharded_apollo_scale(method, grad: Tensor, state: dict, shape: tuple[int, int], rank: int, world: int,
                         group=None) -> Tensor:
    """Apollo.direction for one rank's rows of G (m × n): the grad_scale of those rows, equal to the unsharded
    direction's. state holds this rank's column block of the moments (r × b/world).

    apollo.scaling_chain operation for operation: the moments of the column block are updated locally
    (elementwise), then N, R and the column norms are all-gathered (r × b, r × b, b floats) and every
    norm is taken of the unsharded tensors, so it has the unsharded bits.
    """
    state["step"] = t = state["step"] + 1
    m, n = shape
    proj = random_projection(shape, method.rank, method.projection_seed(state, t), grad.device)  # (a, r), full
    g_hat = _column_block(grad, shape, world, group)  # (a, b_local)
    b, b_local = max(m, n), g_hat.shape[1]
    r, col_sq = _project_block(proj, g_hat, b, rank * b_local)
    b1, b2 = method.betas
    c1, c2 = 1 - b1**t, 1 - b2**t
    mom, var, phi = state["exp_avg"], state["exp_avg_sq"], state["limiter_norm"]
    mom.mul_(b1).add_(r, alpha=1 - b1)
    var.mul_(b2).addcmul_(r, r, value=1 - b2)
    if method.bias_correction == "outside":
        nrm = mom / (var.sqrt() + method.eps)
        step_factor = math.sqrt(c2) / c1
    else:
        nrm = (mom / c1) / ((var / c2).sqrt() + method.eps)
        step_factor = 1.0
    nrm, r, col_sq = _gather_columns([nrm, r, col_sq], group)  # (r, b), (r, b), (b,): the unsharded tensors
    if method.scale_type == "channel":
        s = nrm.norm(dim=0) / (r.norm(dim=0) + 1e-8)  # (b,)
        x_norm = (s.square() * col_sq).sum().sqrt()
    else:
        s = nrm.norm() / (r.norm() + 1e-8)
        x_norm = s * col_sq.sum().sqrt()
    eta, new_phi = norm_growth_factor(x_norm, phi, first=t == 1, gamma=method.gamma)
    phi.copy_(new_phi)
    f = s * (eta * (math.sqrt(method.scale) * step_factor))
    if method.scale_type != "channel":
        return f
    if m < n:
        return f.reshape(1, n)  # every row takes all n column factors
    return f[rank * b_local : (rank + 1) * b_local].reshape(b_local, 1)  # this rank's rows


def _skip_uniforms(generator: torch.Generator, count: int, device) -> None:
    """Advance a CPU generator past `count` SR uniforms (qtrain.quant.stochastic_round.sr_uniforms draws one
    32-bit number per element, in row-major order, whatever the chunking)."""
    block = 1 << 22
    while count > 0:
        k = min(count, block)
        torch.randint(0, 1 << UNIFORM_BITS, (k,), generator=generator, device=device, dtype=torch.float32)
        count -= k


# ---- the sharded model and its updater -----------------------------------------------------------------
def _place(root: nn.Module, dotted: str, obj) -> None:
    """Put a module or parameter at the qualified name `dotted` under root, creating empty parents."""
    *parents, leaf = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part) or getattr(node, part) is None:
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    if isinstance(obj, nn.Parameter):
        node.register_parameter(leaf, obj)
    else:
        node.add_module(leaf, obj)


class ShardedTraining:
    """A qtrain model under FSDP2 and the Updater of this rank's shards.

    `model` trains as before (forward, loss / world, backward); every update runs inside backward in the
    post-accumulate-grad hooks FSDP2 calls on the sharded parameters after the reduce-scatter. `updater` is
    an ordinary Updater over a stand-in module whose tensors are this rank's shards (shared storage): its
    begin_step / finish_step / state_dict work unchanged, and the float tensors' updates are its own.
    """

    def __init__(self, model: nn.Module, cfg, world, device: torch.device):
        found = problems(cfg, model, world.size)
        if found:
            raise TrainingError("cannot train with FSDP2: " + "; ".join(found))
        self.cfg, self.world, self.device = cfg, world, device
        self.rank, self.size = world.rank, world.size
        sd = model.state_dict()
        self.keys = [k for k in sd]  # the unsharded checkpoint's model keys, in order
        self.full_shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self.int8_shapes = {name: (layer.out_features, layer.in_features) for name, layer in int8_layers(model).items()}
        dtype = next(p.dtype for p in model.parameters())  # the float tensors' (build_model stores all alike)
        for layer in int8_layers(model).values():
            _to_sharded_layer(layer, dtype)
        mesh = init_device_mesh(device.type, (world.size,))
        # one unit per block, and the embedding and lm_head (the two largest tensors) each their own, so only
        # one of them is gathered at a time; the root keeps the final norm
        for unit in [model.model.embed_tokens, *model.model.layers, model.lm_head, model]:
            fully_shard(unit, mesh=mesh)
        for unit in model.modules():
            if isinstance(unit, FSDPModule):  # SUM: the loss is already scaled by 1 / world (ReduceOp.AVG is NCCL's)
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        self.model = model
        self.params = dict(model.named_parameters())  # sharded DTensor parameters
        self.updater = self._local_updater()
        for name, p in self.params.items():
            layer_name = name.removesuffix(".weight")
            if layer_name in self.int8_shapes:
                p.register_post_accumulate_grad_hook(lambda p, n=layer_name: self._update_int8(n, p))
            elif p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, n=name: self._update_float(n, p))

    def _local_updater(self):
        root, int8 = nn.Module(), {}
        for layer_name, (m, n) in self.int8_shapes.items():  # first: a layer's float bias goes inside it
            w = _local(self.params[f"{layer_name}.weight"])
            int8[layer_name] = loc = Int8Linear(n, m, w.group_size, w.scale.dtype, device="meta",
                                                bias=f"{layer_name}.bias" in self.params)
            loc.codes = w.codes.new_empty(1).expand(m, n)  # the unsharded shape on the device, no memory
            loc.kernels = self.cfg.quant.kernels
            _place(root, layer_name, loc)
        for name, p in self.params.items():
            if name.removesuffix(".weight") not in self.int8_shapes and p.requires_grad:
                _place(root, name, nn.Parameter(_local(p), requires_grad=True))  # shares the shard's storage
        updater = build_updater(root, self.cfg)  # the method validates the unsharded shapes
        for layer_name, loc in int8.items():  # then each layer holds this rank's rows
            w = _local(self.params[f"{layer_name}.weight"])
            loc.codes, loc.scale, loc.offset = w.codes, w.scale, w.offset
        return updater

    # ---- the hooks FSDP2 calls after each reduce-scatter ----------------------------------------------
    @torch.no_grad()
    def _update_int8(self, name: str, p: nn.Parameter) -> None:
        u = self.updater
        grad, w = _local(p.grad), _local(p)
        p.grad = None
        loc = u.int8[name]
        if loc.codes is not w.codes:  # FSDP2 re-padded the shard: follow its tensors
            loc.codes, loc.scale, loc.offset = w.codes, w.scale, w.offset
        for hook in u.grad_hooks:
            hook(name, grad)
        method, shape = u.matrix_method, self.int8_shapes[name]
        b_local = max(shape) // self.size
        state = u.method_state(name, method, (b_local,), grad.device)  # a column block of the moments
        scale = sharded_apollo_scale(method, grad, state, shape, self.rank, self.size)
        row0 = self.rank * w.codes.shape[0]
        args = (w.codes, w.scale, w.offset, w.group_size, grad, scale, u.lr, method.weight_decay)
        seed = update_seed(u.seed, name_uid(name), u.step)
        if u.rounding != "stochastic":
            int8_scaled_update_(*args, None)
        elif w.codes.device.type == "cpu":  # the unsharded stream: skip the rows before this shard
            generator = torch.Generator().manual_seed(seed)
            _skip_uniforms(generator, row0 * shape[1], w.codes.device)
            int8_scaled_update_(*args, generator)
        else:  # counter-based noise (Triton): a seed per shard, the same distribution
            dispatch.int8_scaled_update_(*args, seed if row0 == 0 else mix_seed(seed, row0) >> 32, u.kernels)
        u._mark(name)

    @torch.no_grad()
    def _update_float(self, name: str, p: nn.Parameter) -> None:
        shadow = self.updater.floats[name]
        local = _local(p)
        if shadow.data_ptr() != local.data_ptr() or shadow.shape != local.shape:
            shadow.data = local  # FSDP2 re-padded the shard: the same Parameter (optimizer state) on its tensor
        shadow.grad = _local(p.grad)
        p.grad = None
        self.updater.update_float(name, shadow)

    # ---- checkpoints: the unsharded format ------------------------------------------------------------
    def _gather(self, t: Tensor, full: int, dim: int) -> Tensor:
        """The unsharded tensor (on the CPU) from every rank's `t`, a torch.chunk block of `full` along dim."""
        per = -(-full // self.size)
        t = t.movedim(dim, 0).contiguous()
        padded = t.new_zeros((per, *t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        return torch.cat(gathered)[:full].movedim(0, dim).cpu()

    def _block(self, t: Tensor, dim: int) -> Tensor:
        """This rank's torch.chunk block of t along dim (the way FSDP2 and the moments are sharded)."""
        chunks = torch.chunk(t, self.size, dim=dim)
        return chunks[self.rank].clone() if self.rank < len(chunks) else t.narrow(dim, 0, 0).clone()

    def full_state(self) -> tuple[dict[str, Tensor], dict]:
        """(model state_dict, Updater state_dict) as the unsharded run would save them, on the CPU; a
        collective: every rank calls it, in the same order."""
        model_sd = {}
        for key in self.keys:
            layer_name, _, attr = key.rpartition(".")
            if layer_name in self.int8_shapes and attr in ("codes", "scale", "offset"):
                local = getattr(_local(self.params[f"{layer_name}.weight"]), attr)
                model_sd[key] = self._gather(local, self.full_shapes[key][0], 0)
            elif key in self.params:
                model_sd[key] = self._gather(_local(self.params[key]).detach(), self.full_shapes[key][0], 0)
            else:  # a replicated buffer
                model_sd[key] = self.model.get_buffer(key).detach().cpu()
        sd = self.updater.state_dict()
        return model_sd, {**sd, "method_state": {n: self._gathered(n, st) for n, st in sd["method_state"].items()},
                          "float_optimizers": {n: self._gathered(n, st) for n, st in sd["float_optimizers"].items()}}

    def load_full_updater_state(self, sd: dict) -> None:
        """Load an unsharded Updater state_dict (a checkpoint of any world size, FSDP2 or not): this rank's
        blocks of it."""
        self.updater.load_state_dict({
            **sd, "method_state": {n: self._sliced(n, st) for n, st in sd["method_state"].items()},
            "float_optimizers": {n: self._sliced(n, st) for n, st in sd["float_optimizers"].items()}})

    def _gathered(self, name: str, state):
        """One tensor's optimizer state (any nesting) with every sharded tensor gathered, on the CPU."""
        if name in self.int8_shapes:  # APOLLO: the moments by columns of the oriented gradient
            b = max(self.int8_shapes[name])
            return _map_tensors(state, lambda key, v: self._gather(v, b, 1) if key in MOMENTS else _cpu(v))
        local, full = tuple(self.updater.floats[name].shape), self.full_shapes[name]

        def gather(key, v):
            if v.dim() and tuple(v.shape) == local:  # Adam's moments, 8-bit Adam's codes: rows
                return self._gather(v, full[0], 0)
            if key in BLOCK_STATISTICS:  # 8-bit Adam's per-block absmax: whole blocks per rank
                per_block = math.prod(local) // v.numel()
                return self._gather(v, -(-math.prod(full) // per_block), 0)
            return _cpu(v)  # step counters, 8-bit Adam's quantization maps: replicated

        return _map_tensors(state, gather)

    def _sliced(self, name: str, state):
        """The inverse of _gathered: this rank's blocks of an unsharded state."""
        if name in self.int8_shapes:
            return _map_tensors(state, lambda key, v: self._block(v, 1) if key in MOMENTS else v)
        full = self.full_shapes[name]
        return _map_tensors(state, lambda key, v: self._block(v, 0) if (
            v.dim() and tuple(v.shape) == full) or key in BLOCK_STATISTICS else v)

    def persistent_bytes(self) -> int:
        """Bytes this rank keeps between steps: its shards of the weights and of every optimizer state."""
        return persistent_bytes(self.model, self.updater)


def persistent_bytes(model: nn.Module, updater) -> int:
    """Bytes a process keeps between steps, counted on the tensors it holds (each storage once): the weights
    (a sharded model: this rank's shards), the buffers, the method states and the float optimizers' states."""
    tensors = []
    for p in model.parameters():
        local = _local(p)
        tensors += [local.codes, local.scale, local.offset] if isinstance(local, Int8Weight) else [local]
    tensors += list(model.buffers())
    tensors += _tensors(updater.state) + _tensors([list(opt.state.values()) for opt in updater.float_opts.values()])
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _cpu(v):
    return v.detach().cpu() if isinstance(v, Tensor) else v


def _map_tensors(obj, fn, key=None):
    """obj (nested dicts, lists, tuples) with each tensor v replaced by fn(key, v), key its dict key."""
    if isinstance(obj, Tensor):
        return fn(key, obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, key) for v in obj)
    return obj


def _tensors(obj) -> list[Tensor]:
    out = []
    _map_tensors(obj, lambda key, v: out.append(v))
    return out


class StateView:
    """A model or Updater stand-in holding a state_dict: what save_run reads from a gathered state, and what
    load_run hands an Updater (the unsharded state, sliced by ShardedTraining.load_full_updater_state)."""

    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self, *args, **kwargs) -> dict:
        return self.sd

    def load_state_dict(self, sd: dict) -> None:
        self.sd = sd
