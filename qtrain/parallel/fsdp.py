"""FSDP2 (torch.distributed.fsdp.fully_shard) for qtrain models: int8 weights sharded by rows.

Each int8 projection's codes, scales and offsets become one `Int8Weight` (qtrain.parallel.int8_weight) that FSDP2 shards
by rows, all-gathers as int8 for compute and whose dW it reduce-scatters; FSDP2 then calls the post-accumulate-
grad hook on the sharded parameter, and that hook runs the update on the local rows only. Float tensors
(embedding, norms, lm_head) are ordinary FSDP2 parameters, updated in the same hook on their local shard.

Why a sharded update equals the unsharded one:
  - the reduce-scatter is a SUM (the loss is scaled by 1/world before backward, as in data parallel);
  - Adam is elementwise, so a shard's update is the full update's rows;
  - APOLLO's statistics span columns of the whole matrix: qtrain.parallel.apollo_sharded computes them over
    column blocks and gathers what the norms need, so every norm is taken of the unsharded tensors;
  - stochastic rounding on the CPU draws one number per element, in row-major order, from the tensor's
    generator: a shard skips the draws of the rows before it and rounds exactly like the same rows of the full
    tensor. On CUDA (Triton's counter-based noise) a shard's seed is mixed with its first row instead: the
    same distribution, not the single-GPU bits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from qtrain.config import rules
from qtrain.config.recipe import TrainConfig
from qtrain.core import statetree
from qtrain.core.statetree import map_tensors
from qtrain.errors import TrainingError
from qtrain.hf.pretrained import load_rows_
from qtrain.model.builder import initial_rows, int8_layers
from qtrain.parallel.apollo_sharded import sharded_apollo_scale
from qtrain.parallel.distributed import World
from qtrain.parallel.int8_weight import Int8Weight, local_tensor, to_sharded_layer
from qtrain.quant.groupwise import quantize_groupwise
from qtrain.quant.linear import Int8Linear
from qtrain.update.build import build_updater
from qtrain.update.updater import Updater

MOMENTS = ("exp_avg", "exp_avg_sq")  # APOLLO's projected moments (r x b): sharded by columns
BLOCK_STATISTICS = ("absmax1", "absmax2")  # bitsandbytes' 8-bit Adam: one absmax per block of its flat state


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

    def __init__(self, model: nn.Module, cfg: TrainConfig, world: World, device: torch.device, init: bool = True):
        """model: built in memory (every rank the same weights), or on the meta device: then each rank allocates
        and fills only its shards (`init`; False: a run checkpoint fills them), with its rows of the random init
        or of the [model] init checkpoint."""
        found = rules.fsdp_problems(cfg, world.size)  # `qtrain train` checked them before building anything
        if found:
            raise TrainingError("cannot train with FSDP2: " + "; ".join(found))
        self.cfg, self.world, self.device = cfg, world, device
        self.rank, self.size = world.rank, world.size
        sd = model.state_dict()
        # lm_head.weight when embeddings are tied: the embedding's Parameter (found by identity: on the meta device
        # every tensor has the same data_ptr)
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
        self.keys = [k for k in sd if k not in tied]  # the unsharded checkpoint's model keys, in order
        self.full_shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self.int8_shapes = {name: (layer.out_features, layer.in_features) for name, layer in int8_layers(model).items()}
        dtype = next(p.dtype for p in model.parameters())  # the float tensors' (build_model stores all alike)
        for layer in int8_layers(model).values():
            to_sharded_layer(layer, dtype)
        self.mesh = mesh = init_device_mesh(device.type, (world.size,))
        # one unit per block, and the embedding and lm_head (the two largest tensors) each their own, so only
        # one of them is gathered at a time; the root keeps the final norm. Tied, they are one tensor, which
        # must lie in one unit: the root's (gathered for the whole step, reduce-scattered once after backward)
        ends = [] if tied else [model.model.embed_tokens, model.lm_head]
        for unit in [*ends[:1], *model.model.layers, *ends[1:], model]:
            fully_shard(unit, mesh=mesh)
        for unit in model.modules():
            if isinstance(unit, FSDPModule):  # SUM: the loss is already scaled by 1 / world (ReduceOp.AVG is NCCL's)
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        if any(t.is_meta for t in model.parameters()):  # per-rank materialisation: only this rank's shards
            model.to_empty(device=device)
            with torch.device(device):
                model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # computed, not stored
            self.bytes_read = 0  # of a [model] init checkpoint: this rank's rows only
            if init and cfg.model.init:
                self.bytes_read = self._checkpoint_init(model, cfg.model.init)
            elif init:
                self._random_init(model)
        self.model = model
        self.params = dict(model.named_parameters())  # sharded DTensor parameters
        self.updater = self._local_updater()
        for name, p in self.params.items():
            layer_name = name.removesuffix(".weight")
            if layer_name in self.int8_shapes:
                p.register_post_accumulate_grad_hook(lambda p, n=layer_name: self._update_int8(n, p))
            elif p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, n=name: self._update_float(n, p))

    def _row0(self, name: str, rows: int) -> int:
        """The first row of this rank's torch.chunk block of a tensor of `rows` rows (FSDP2's split)."""
        return min(rows, self.rank * -(-rows // self.size))

    def _checkpoint_init(self, model: nn.Module, init: str) -> int:
        """Fill this rank's shards from a Hugging Face checkpoint, reading only its rows; returns the bytes read."""
        int8, floats, full = {}, {}, {}
        for name, p in model.named_parameters():
            local, layer_name = local_tensor(p), name.removesuffix(".weight")
            if layer_name in self.int8_shapes:
                m, n = full[name] = self.int8_shapes[layer_name]
                layer = Int8Linear(n, local.codes.shape[0], local.group_size, local.scale.dtype, device="meta")
                layer.codes, layer.scale, layer.offset = local.codes, local.scale, local.offset
                int8[name] = (layer, self.first_row(layer_name))
            else:
                full[name] = self.full_shapes[name]
                floats[name] = (local.detach(), self._row0(name, full[name][0]))
        return load_rows_(init, int8, floats, full)

    @torch.no_grad()
    def _random_init(self, model: nn.Module) -> None:
        """Fill this rank's shards with their rows of build_model's random init (drawn on the CPU): the same
        weights for every world size, and those of a one-process CPU build (model.builder.initial_rows)."""
        seed, std = self.cfg.train.seed, self.cfg.model.init_std
        for name, p in model.named_parameters():
            local, layer_name = local_tensor(p), name.removesuffix(".weight")
            if layer_name in self.int8_shapes:
                shape, r0 = self.int8_shapes[layer_name], self.first_row(layer_name)
                w = initial_rows(name, shape, r0, r0 + local.codes.shape[0], seed, std)
                for part, v in zip(("codes", "scale", "offset"), quantize_groupwise(w, local.group_size,
                                                                                   local.scale.dtype)):
                    getattr(local, part).copy_(v)  # nearest rounding, as Int8Linear.load_float_
            elif len(self.full_shapes[name]) == 1:  # RMSNorm weights 1, biases 0 (sharded or not)
                local.fill_(0.0 if name.endswith(".bias") else 1.0)
            else:  # FSDP2 shards by torch.chunk: rank r holds rows r * ceil(m / world) ..
                r0 = self._row0(name, self.full_shapes[name][0])
                local.copy_(initial_rows(name, self.full_shapes[name], r0, r0 + local.shape[0], seed, std))

    def _local_updater(self) -> Updater:
        root, int8 = nn.Module(), {}
        for layer_name, (m, n) in self.int8_shapes.items():  # first: a layer's float bias goes inside it
            w = local_tensor(self.params[f"{layer_name}.weight"])
            int8[layer_name] = loc = Int8Linear(n, m, w.group_size, w.scale.dtype, device="meta",
                                                bias=f"{layer_name}.bias" in self.params)
            loc.codes = w.codes.new_empty(1).expand(m, n)  # the unsharded shape on the device, no memory
            loc.kernels = self.cfg.quant.kernels
            _place(root, layer_name, loc)
        for name, p in self.params.items():
            if name.removesuffix(".weight") not in self.int8_shapes and p.requires_grad:
                _place(root, name, nn.Parameter(local_tensor(p), requires_grad=True))  # shares the shard's storage
        updater = build_updater(root, self.cfg)  # the method validates the unsharded shapes
        updater.shards = self
        for layer_name, loc in int8.items():  # then each layer holds this rank's rows
            w = local_tensor(self.params[f"{layer_name}.weight"])
            loc.codes, loc.scale, loc.offset = w.codes, w.scale, w.offset
        return updater

    # ---- the hooks FSDP2 calls after each reduce-scatter ----------------------------------------------
    @torch.no_grad()
    def _update_int8(self, name: str, p: nn.Parameter) -> None:
        grad, w = local_tensor(p.grad), local_tensor(p)
        p.grad = None
        loc = self.updater.int8[name]
        if loc.codes is not w.codes:  # FSDP2 re-padded the shard: follow its tensors
            loc.codes, loc.scale, loc.offset = w.codes, w.scale, w.offset
        self.updater.update_int8(loc, grad)  # the Updater's update of these rows (RowShards below)

    # ---- RowShards: what the Updater asks of the sharding -------------------------------------------
    def first_row(self, name: str) -> int:
        return self.rank * (self.int8_shapes[name][0] // self.size)

    def grad_scale(self, name: str, grad: Tensor) -> Tensor:
        method, shape = self.updater.matrix_method, self.int8_shapes[name]
        state = self.updater.method_state(name, method, (max(shape) // self.size,), grad.device)  # a column block
        return sharded_apollo_scale(method, grad, state, shape, self.rank, self.size)

    @torch.no_grad()
    def _update_float(self, name: str, p: nn.Parameter) -> None:
        shadow = self.updater.floats[name]
        local = local_tensor(p)
        if shadow.data_ptr() != local.data_ptr() or shadow.shape != local.shape:
            shadow.data = local  # FSDP2 re-padded the shard: the same Parameter (optimizer state) on its tensor
        shadow.grad = local_tensor(p.grad)
        p.grad = None
        self.updater.update_float(name, shadow)

    # ---- checkpoints: gathered (the unsharded format) or sharded (DTensors) ------------------------------------------------------------
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

    def _dtensor(self, t: Tensor, full: int, dim: int) -> DTensor:
        """This rank's `t` as its block of the unsharded tensor (no copy): what torch.distributed.checkpoint
        writes per rank, and reads back into the blocks of any world size."""
        shape = list(t.shape)
        shape[dim] = full
        return DTensor.from_local(t, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())

    def _state(self, place) -> tuple[dict[str, Tensor], dict]:
        """(model state_dict, Updater state_dict) under the unsharded run's keys, each sharded tensor turned
        into place(local block, unsharded length, dim)."""
        model_sd = {}
        for key in self.keys:
            layer_name, _, attr = key.rpartition(".")
            if layer_name in self.int8_shapes and attr in ("codes", "scale", "offset"):
                local = getattr(local_tensor(self.params[f"{layer_name}.weight"]), attr)
                model_sd[key] = place(local, self.full_shapes[key][0], 0)
            elif key in self.params:
                model_sd[key] = place(local_tensor(self.params[key]).detach(), self.full_shapes[key][0], 0)
            else:  # a replicated buffer
                model_sd[key] = self.model.get_buffer(key).detach().cpu()
        sd = self.updater.state_dict()
        return model_sd, {**sd, "method_state": {n: self._placed(n, st, place) for n, st in sd["method_state"].items()},
                          "float_optimizers": {n: self._placed(n, st, place)
                                               for n, st in sd["float_optimizers"].items()}}

    def full_state(self) -> tuple[dict[str, Tensor], dict]:
        """(model state_dict, Updater state_dict) as the unsharded run would save them, on the CPU; a
        collective: every rank calls it, in the same order."""
        return self._state(self._gather)

    def sharded_state(self) -> tuple[dict[str, Tensor], dict]:
        """The same state with each sharded tensor a DTensor over this rank's block (no gather, no copy): what
        a sharded checkpoint (torch.distributed.checkpoint) saves."""
        return self._state(self._dtensor)

    def load_local_state(self, model_sd: dict[str, Tensor], updater_sd: dict) -> None:
        """Load this rank's blocks of a checkpoint (read by torch.distributed.checkpoint for this world size):
        the model's under the unsharded keys, the Updater's as _state places them."""
        for key, v in model_sd.items():
            layer_name, _, attr = key.rpartition(".")
            if layer_name in self.int8_shapes and attr in ("codes", "scale", "offset"):
                getattr(local_tensor(self.params[f"{layer_name}.weight"]), attr).copy_(v)
            elif key in self.params:
                local_tensor(self.params[key]).detach().copy_(v)
            else:
                self.model.get_buffer(key).copy_(v)
        self.updater.load_state_dict(updater_sd)

    def load_full_updater_state(self, sd: dict) -> None:
        """Load an unsharded Updater state_dict (a checkpoint of any world size, FSDP2 or not): this rank's
        blocks of it."""
        self.updater.load_state_dict({
            **sd, "method_state": {n: self._sliced(n, st) for n, st in sd["method_state"].items()},
            "float_optimizers": {n: self._sliced(n, st) for n, st in sd["float_optimizers"].items()}})

    def _placed(self, name: str, state, place):
        """One tensor's optimizer state (any nesting) with every sharded tensor turned into place(block, full,
        dim); replicated ones (step counters, scalars) on the CPU."""
        if name in self.int8_shapes:  # APOLLO: the moments by columns of the oriented gradient
            b = max(self.int8_shapes[name])
            return map_tensors(state, lambda key, v: place(v, b, 1) if key in MOMENTS else _cpu(v))
        local, full = tuple(self.updater.floats[name].shape), self.full_shapes[name]

        def placed(key, v):
            if v.dim() and tuple(v.shape) == local:  # Adam's moments, 8-bit Adam's codes: rows
                return place(v, full[0], 0)
            if key in BLOCK_STATISTICS:  # 8-bit Adam's per-block absmax: whole blocks per rank
                per_block = math.prod(local) // v.numel()
                return place(v, -(-math.prod(full) // per_block), 0)
            return _cpu(v)  # step counters, 8-bit Adam's quantization maps: replicated

        return map_tensors(state, placed)

    def _sliced(self, name: str, state):
        """The inverse of _gathered: this rank's blocks of an unsharded state."""
        if name in self.int8_shapes:
            return map_tensors(state, lambda key, v: self._block(v, 1) if key in MOMENTS else v)
        full = self.full_shapes[name]
        return map_tensors(state, lambda key, v: self._block(v, 0) if (
            v.dim() and tuple(v.shape) == full) or key in BLOCK_STATISTICS else v)

    def persistent_bytes(self) -> int:
        """Bytes this rank keeps between steps: its shards of the weights and of every optimizer state."""
        return persistent_bytes(self.model, self.updater)


def persistent_bytes(model: nn.Module, updater: Updater) -> int:
    """Bytes a process keeps between steps, counted on the tensors it holds (each storage once): the weights
    (a sharded model: this rank's shards), the buffers, the method states and the float optimizers' states."""
    tensors = []
    for p in model.parameters():
        local = local_tensor(p)
        tensors += [local.codes, local.scale, local.offset] if isinstance(local, Int8Weight) else [local]
    tensors += list(model.buffers())
    tensors += statetree.tensors(updater.state) + statetree.tensors([list(opt.state.values()) for opt in updater.float_opts.values()])
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _cpu(v):
    return v.detach().cpu() if isinstance(v, Tensor) else v


class StateView:
    """A model or Updater stand-in holding a state_dict: what save_run reads from a gathered state, and what
    load_run hands an Updater (the unsharded state, sliced by ShardedTraining.load_full_updater_state)."""

    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self, *args, **kwargs) -> dict:
        return self.sd

    def load_state_dict(self, sd: dict) -> None:
        self.sd = sd
