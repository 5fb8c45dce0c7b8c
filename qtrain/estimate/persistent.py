"""Persistent bytes of a run, never from formulas: the trainer's constructors on the meta device.

The model is built with `build_model` on meta, the updater with `build_updater`, every method state is created
by the method's own `init_state` (through `Updater.method_state`, the trainer's own path) and every float
optimizer takes one real step on meta tensors so bitsandbytes / torch create their lazy state there; the
estimator sums the `nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from qtrain.config.recipe import TrainConfig
from qtrain.estimate.breakdown import Component
from qtrain.model.builder import META_DTYPES, build_model
from qtrain.update.build import build_updater
from qtrain.update.updater import Updater

META = torch.device("meta")


@dataclass
class Persistent:
    """What lives through the whole run: the updater built on meta (its model, method and optimizer states),
    one Component per kind of tensor, and the distinct tensors themselves (for the allocator's rounding)."""

    updater: Updater
    components: list[Component]
    tensors: list[torch.Tensor]

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.components)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts / lists / tuples (a method's state, an optimizer's)."""
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _on_device(tensors, device_type: str) -> list[torch.Tensor]:
    """Distinct tensors that live on the training device.

    Meta tensors stand for device tensors. A CPU tensor created beside them (AdamW's `step` counter) lives
    in host memory: it counts for a CPU run only.
    """
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen and (t.device.type == "meta" or device_type == "cpu"):
            seen.add(id(t))
            out.append(t)
    return out


@torch.no_grad()
def _step_float_optimizers_on_meta(updater) -> None:
    """One real step of every float optimizer on meta tensors: their lazy state is created there."""
    for name, opt in updater.float_opts.items():
        p = updater.floats[name]
        p.grad = torch.empty_like(p)
        opt.step()
        p.grad = None


def shard_bytes(t: torch.Tensor, shards: int, dim: int | None) -> int:
    """Bytes of one rank's torch.chunk block of t along dim (FSDP2's and qtrain.parallel.fsdp's split); dim None or a
    0-dim tensor: replicated."""
    if shards == 1 or dim is None or t.dim() == 0:
        return t.numel() * t.element_size()
    size = t.shape[dim]
    return -(-size // shards) * (t.numel() // max(size, 1)) * t.element_size()


def persistent(cfg: TrainConfig, device_type: str, shards: int = 1) -> Persistent:
    """The updater on meta, the persistent components and tensors, from the trainer's own constructors.

    shards > 1 (FSDP2, qtrain.parallel.fsdp): each component counts one rank's blocks: weights, float tensors and
    optimizer states by rows, APOLLO's moments by columns; the RoPE buffers and scalars are replicated."""
    model = build_model(cfg.model, cfg.quant, META)
    want = META_DTYPES[cfg.model.float_dtype]
    assert all(p.dtype == want for p in model.parameters()), (
        f"build_model stored float parameters in {sorted({str(p.dtype) for p in model.parameters()})}; "
        f"[model] float_dtype = {cfg.model.float_dtype!r}")
    updater = build_updater(model, cfg)
    for name, layer in updater.int8.items():  # what update_int8 creates at the first step
        updater.method_state(name, updater.matrix_method, tuple(layer.codes.shape), META)
    for name, method in updater.method_floats.items():  # what update_float creates at the first step
        updater.method_state(name, method, tuple(updater.floats[name].shape), META)
    _step_float_optimizers_on_meta(updater)

    layers = updater.int8.values()
    codes = [l.codes for l in layers]
    groups = [t for l in layers for t in (l.scale, l.offset)]
    quantized = {id(t) for t in codes + groups}
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in quantized]
    buffers = {id(t) for t in model.buffers()} - quantized  # RoPE tables: replicated under FSDP2
    groups_of = [
        (Component("int8 codes", 0, "persistent", "Int8Linear.codes (build_model on meta)"), codes),
        (Component(f"group scale/offset ({cfg.quant.meta_dtype})", 0, "persistent",
                   "Int8Linear.scale/offset (build_model on meta)"), groups),
        (Component(f"float parameters ({cfg.model.float_dtype}: embedding, norms, lm_head) + RoPE buffers", 0,
                   "persistent", "build_model on meta"), floats),
    ]
    method_tensors: set[int] = set()
    by_method: dict[str, list] = {}
    for name, state in updater.state.items():
        method = updater.method_floats.get(name, updater.matrix_method)
        label = cfg.optim.method if method is updater.matrix_method else f"{type(method).__name__} (bf16 floats)"
        by_method.setdefault(label, [type(method).__name__, []])[1].extend(_tensors(state))
        method_tensors.update(id(t) for t in _tensors(state))
    for label, (cls, tensors) in by_method.items():
        groups_of.append((Component(f"{label} states", 0, "persistent",
                                    f"{cls}.init_state via Updater.method_state on meta"), tensors))
    by_opt: dict[str, list] = {}
    for opt in updater.float_opts.values():
        kind = type(opt)
        label = getattr(kind, "STATE_LABEL", kind.__name__)  # FusedAdamWSlot: the group's flat buffers, by slice
        by_opt.setdefault(label, [f"{kind.__module__}.{kind.__name__}", []])[1].extend(
            _tensors(list(opt.state.values())))
    for label, (path, tensors) in sorted(by_opt.items()):
        groups_of.append((Component(f"{label} states", 0, "persistent", f"{path}.step on meta"), tensors))
    comps, everything = [], []
    for comp, tensors in groups_of:
        tensors = _on_device(tensors, device_type)
        comp.bytes = sum(shard_bytes(t, shards, None if id(t) in buffers else -1 if id(t) in method_tensors
                                      and t.dim() == 2 else 0) for t in tensors)
        comps.append(comp)
        everything += tensors
    return Persistent(updater, comps, everything)

