"""Per-tensor updates of a qtrain model: the optimizer state of every trainable tensor and one update rule each.

`Updater` owns the state of every trainable tensor, keyed by qualified name, and one global step counter and
learning rate read by all tensors. `update_int8` / `update_float` apply one update to one tensor and free its
gradient. Who calls them is the mode's business: layer-wise release (qtrain.update.release) calls them from hooks the
moment a gradient is final; otherwise `finish_step()` calls them after backward for every gradient present.
Both modes run identical arithmetic, which the tests check bit for bit.
The step's LRs, step number and SR seeds also live on the device (`self.clock`, qtrain.core.step_state), rewritten by
begin_step: the kernels read them there, so a step captured in a CUDA graph (qtrain.update.step_graph) replays correctly.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from qtrain.core.seeding import name_uid
from qtrain.core.statetree import map_tensors
from qtrain.core.step_state import StepState
from qtrain.model.builder import float_parameters, int8_layers, is_quantized_projection
from qtrain.optim.base import Method, Update
from qtrain.optim.float_adam import FloatAdam
from qtrain.optim.float_update import float_update_, round_to_bf16
from qtrain.quant import dispatch
from qtrain.quant.int8_update import int8_scaled_update_
from qtrain.quant.linear import Int8Linear
from qtrain.update.grad_norm import GradNorm

FloatOptimizerFactory = Callable[[nn.Parameter], torch.optim.Optimizer]


class RowShards(Protocol):
    """What an Updater over row shards of its int8 weights asks of the sharding (qtrain.parallel.fsdp)."""

    def first_row(self, name: str) -> int:
        """The row of the whole weight where this rank's rows start."""

    def grad_scale(self, name: str, grad: Tensor) -> Tensor:
        """The method's grad_scale of these rows, statistics taken across the shards (equal to the unsharded)."""


class Updater:
    """Optimizer state and update rules for every trainable tensor of a qtrain model.

    matrix_method: the method for the seven projections, int8 or float (and lm_head if `lm_head_method`).
    float_optimizer: builds one torch optimizer per other float tensor (embedding, lm_head; norms and biases
        too unless it has a `fused` method, see qtrain.optim.float_adam.FloatAdam: then the vectors, 1-D float
        tensors, share one FusedAdamW per dtype, applied once in finish_step).
    rounding: "stochastic" (SR, seeded by (seed, tensor, step)) or "nearest" (for comparison only).
    kernels: int8 update backend, "auto" (Triton on CUDA), "torch" (reference) or "triton".
    """

    def __init__(self, model: nn.Module, matrix_method: Method, float_optimizer: FloatOptimizerFactory,
                 *, lm_head_method: Method | None = None, embedding_method: Method | None = None,
                 low_precision_adam: Method | None = None, seed: int = 0, rounding: str = "stochastic",
                 float_grad_clip: float = 0.0, kernels: str = "auto"):
        self.model = model
        self.matrix_method = matrix_method
        self.low_precision_adam = low_precision_adam
        self.seed = seed
        self.rounding = rounding
        self.kernels = kernels  # "auto" | "torch" | "triton": see qtrain.quant.dispatch
        self.float_grad_clip = float_grad_clip
        self.step = 0  # optimizer updates completed; the update in flight is number step + 1
        self.lr = self.float_lr = 0.0
        self.int8 = int8_layers(model)
        self.floats = float_parameters(model)
        # Float projections (quantization off) take the matrix method like int8 ones; lm_head and the
        # embedding optionally. bf16 float tensors get `low_precision_adam` when given (fp32 Adam state, SR
        # on apply); torch's AdamW would keep bf16 moments and round every update to nearest.
        self.method_floats: dict[str, Method] = {}
        fused = getattr(float_optimizer, "fused", None)
        for n, p in self.floats.items():
            if is_quantized_projection(n.removesuffix(".weight")):
                self.method_floats[n] = matrix_method
            elif lm_head_method is not None and n.startswith("lm_head"):
                self.method_floats[n] = lm_head_method
            elif embedding_method is not None and n.endswith("embed_tokens.weight"):
                self.method_floats[n] = embedding_method
            elif p.dtype != torch.float32 and low_precision_adam is not None and not (fused and p.dim() < 2):
                self.method_floats[n] = low_precision_adam
        # Vectors (norm weights, biases): one fused AdamW per dtype, staged by their hooks, applied once in
        # finish_step (qtrain.optim.fused_adam: no launches per tensor beyond a copy, no sync). Their slots sit
        # in float_opts like per-tensor optimizers (state, state_dict, step stages the gradient).
        vectors = {n: p for n, p in self.floats.items() if n not in self.method_floats and fused and p.dim() < 2}
        self.fused_floats = [fused({n: p for n, p in vectors.items() if p.dtype == dtype})
                             for dtype in dict.fromkeys(p.dtype for p in vectors.values())]
        # Per-step values on the device (LRs, step, SR seeds): what the kernels read, so a captured step is
        # replayed with each step's values (qtrain.core.step_state). self.lr / self.step stay the host's copy.
        device = next(iter(self.int8.values())).codes.device if self.int8 else next(iter(self.floats.values())).device
        self.clock = StepState(device, seed, [*self.int8, *self.floats, *map(_fused_name, self.fused_floats)])
        build = (lambda p: float_optimizer(p, self.clock, kernels)) if isinstance(float_optimizer, FloatAdam) \
            else float_optimizer  # FloatAdam: its capturable 8-bit Adam reads the clock
        self.float_opts = {n: build(p) for n, p in self.floats.items() if n not in self.method_floats and n not in vectors}
        self.float_opts.update({n: slot for group in self.fused_floats for n, slot in group.slots.items()})
        self.vectors = {n for group in self.fused_floats for n in group.names}
        self.grad_norm: GradNorm | None = None  # see measure_grad_norm
        self.state: dict[str, dict[str, Any]] = {}  # method state per int8 layer / method-trained float
        self.updated: set[str] = set()  # names updated in the current step (checks "exactly once")
        self.grad_hooks: list[Callable[[str, Tensor], None]] = []  # see add_grad_hook
        self.shards: RowShards | None = None  # FSDP2: each int8 layer holds one rank's rows of its weight
        for name, layer in self.int8.items():
            layer.name = name
            matrix_method.validate(tuple(layer.codes.shape))  # fail before step 1, not inside backward
        for name, method in self.method_floats.items():
            method.validate(tuple(self.floats[name].shape))

    # ---- one tensor -------------------------------------------------------------------------------
    def add_grad_hook(self, hook: Callable[[str, Tensor], None]) -> None:
        """hook(name, grad) runs on every final gradient before its update (reduction, norms, checks)."""
        self.grad_hooks.append(hook)

    def measure_grad_norm(self, across_ranks: bool = False) -> GradNorm:
        """From now on, measure every step's global gradient norm on the device (after the grad hooks, so of the
        final gradient; before any float clipping): `take()` it after each step. Slots: every tensor, and one per
        fused vector group (its staged gradients' norm, one launch in finish_step). across_ranks: FSDP2 shards."""
        names = [*self.int8, *self.floats, *map(_fused_name, self.fused_floats)]
        self.grad_norm = GradNorm(self.clock.t.device, names, across_ranks)
        return self.grad_norm

    def _direction(self, method: Method, name: str, grad: Tensor, state: dict[str, Any], measured: bool) -> Update:
        """The method's direction, measuring the gradient norm unless `measured`: inside the method's own pass
        when it can (measures_grad_norm), else with one launch."""
        g = _grad_for(method, grad)
        if self.grad_norm is None or measured:
            return method.direction(g, state, self.clock)
        if method.measures_grad_norm:
            return method.direction(g, state, self.clock, norm_out=self.grad_norm.slot(name))
        self.grad_norm.measure(name, grad)
        return method.direction(g, state, self.clock)

    def method_state(self, name: str, method: Method, shape: tuple[int, ...], device) -> dict[str, Any]:
        if name not in self.state:
            self.state[name] = method.init_state(shape, device, name_uid(name))
        return self.state[name]

    @torch.no_grad()
    def update_int8(self, layer: Int8Linear, grad: Tensor) -> None:
        """dequantize -> method update in fp32 -> requantize (SR), chunked; frees the gradient."""
        name = layer.name
        for hook in self.grad_hooks:
            hook(name, grad)
        first_row = 0
        if self.shards is not None:  # a row shard: the statistics span every shard
            if self.grad_norm is not None:
                self.grad_norm.measure(name, grad)  # this rank's rows: take() sums the squares over the ranks
            scale, first_row = self.shards.grad_scale(name, grad), self.shards.first_row(name)
        else:
            state = self.method_state(name, self.matrix_method, tuple(layer.codes.shape), grad.device)
            update = self._direction(self.matrix_method, name, grad, state, measured=False)
            if update.dense is not None:
                grad, scale = update.dense, torch.ones((), device=grad.device)
            else:
                scale = update.grad_scale
        args = (layer.codes, layer.scale, layer.offset, layer.group_size, grad, scale)
        if self.rounding == "stochastic":  # fused Triton kernel on CUDA, chunked torch reference elsewhere
            dispatch.int8_scaled_update_(*args, self.clock.lr_value, self.matrix_method.weight_decay,
                                         self.clock.seed(name), self.kernels, first_row)
        else:  # nearest rounding: comparison mode, reference path only (not capturable: a host lr)
            int8_scaled_update_(*args, self.lr, self.matrix_method.weight_decay, None)
        layer.weight_grad = None
        self._mark(name)

    @torch.no_grad()
    def update_float(self, name: str, p: nn.Parameter) -> None:
        for hook in self.grad_hooks:
            hook(name, p.grad)
        # the norm before clipping; a vector of a fused group is measured with its group (finish_step)
        measured = self.grad_norm is None or (name in self.vectors and not self.float_grad_clip)
        if self.float_grad_clip > 0:  # per tensor: release mode never knows the global norm (docs/algorithms.md §13)
            if not measured:
                self.grad_norm.measure(name, p.grad)
                measured = True
            nn.utils.clip_grad_norm_([p], self.float_grad_clip)
        if name in self.method_floats:
            method = self.method_floats[name]
            state = self.method_state(name, method, tuple(p.shape), p.device)
            lr = self.clock.float_lr_value if method is self.low_precision_adam else self.clock.lr_value
            seed = self.clock.seed(name) if p.dtype == torch.bfloat16 else None
            # one kernel on CUDA (qtrain.optim.float_update), else apply_update_ with the seed's generator
            update = self._direction(method, name, p.grad, state, measured)
            float_update_(p, update, p.grad, lr, method.weight_decay, seed, self.kernels)
        else:
            if not measured:
                self.grad_norm.measure(name, p.grad)
            opt = self.float_opts[name]  # a per-tensor optimizer steps; a FusedAdamW slot stages the gradient
            for group in opt.param_groups:
                group["lr"] = self.float_lr
            opt.step()
        p.grad = None
        self._mark(name)

    def _mark(self, name: str) -> None:
        if name in self.updated:
            raise RuntimeError(
                f"{name} was updated twice in step {self.step + 1}: release mode saw a second backward "
                f"before the step ended; use [train] release = false for gradient accumulation"
            )
        self.updated.add(name)

    # ---- both modes -------------------------------------------------------------------------------
    def begin_step(self, lr: float, float_lr: float | None = None) -> None:
        """Set the LR every tensor uses in this update (§13: one schedule, no per-tensor schedulers).

        float_lr: LR of the Adam-trained float tensors when the recipe sets its own (same schedule).
        """
        self.lr = lr
        self.float_lr = lr if float_lr is None else float_lr
        self.clock.set(self.step + 1, self.lr, self.float_lr)
        self.updated.clear()
        for group in self.fused_floats:
            group.received.clear()
        for name, state in self.state.items():  # e.g. APOLLO's kept projections whose window ends
            layer = self.int8.get(name)
            self.method_floats.get(name, self.matrix_method).prepare(
                state, tuple(layer.codes.shape if layer is not None else self.floats[name].shape), self.step + 1)

    def replayed(self) -> None:
        """A captured step (qtrain.update.step_graph) was replayed: advance the host counters its Python advanced
        when it was captured (the device work, state included, ran in the replay)."""
        for state in self.state.values():
            if "step" in state:
                state["step"] += 1
        for group in self.fused_floats:
            group.steps += 1
        self.step += 1

    def finish_step(self) -> None:
        """Apply the updates of every gradient still present (all of them without release, none with it),
        then check that every tensor was updated exactly once in this step."""
        for name, layer in self.int8.items():
            if layer.weight_grad is not None:
                self.update_int8(layer, layer.weight_grad)
        for name, p in self.floats.items():
            if p.grad is not None:
                self.update_float(name, p)
        missing = set(self.int8) | set(self.floats)
        missing -= self.updated
        if missing:
            raise RuntimeError(f"step {self.step + 1}: no gradient reached {sorted(missing)[:5]} "
                               f"({len(missing)} tensors); every trainable tensor must be updated each step")
        for group in self.fused_floats:  # the vectors' staged gradients, one update for all (both modes)
            if self.grad_norm is not None and not self.float_grad_clip:  # their norm, one launch for the group
                self.grad_norm.measure(_fused_name(group), group.grad)
            # SR like every bf16 float tensor's update (update_float); LR, step and seed read on the device
            seed = self.clock.seed(_fused_name(group))
            group.step(self.clock.float_lr, t=self.clock.t,
                       to_bf16=lambda w, seed=seed: round_to_bf16(w, seed, self.kernels))
        self.step += 1

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "method_state": self.state,
            "float_optimizers": {n: opt.state_dict() for n, opt in self.float_opts.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a state_dict whose tensors may sit on any device (a checkpoint loads them on the CPU).

        Method states move to their tensor's device. The float optimizers get theirs untouched: torch's own
        load_state_dict moves moments to the parameter's device and keeps AdamW's `step` on the CPU, where
        its (non-capturable) step reads it without a host-device sync.
        """
        self.step = sd["step"]
        devices = {**{n: layer.codes.device for n, layer in self.int8.items()},
                   **{n: p.device for n, p in self.floats.items()}}
        self.state = {name: map_tensors(st, lambda key, v, d=devices[name]: v.to(d)) for name, st in sd["method_state"].items()}
        for n, opt in self.float_opts.items():
            opt.load_state_dict(sd["float_optimizers"][n])


def _fused_name(group) -> str:
    """The SR seed name of a FusedAdamW group (one per dtype)."""
    return f"fused_adamw/{group.dtype}"




def _grad_for(method: Method, grad: Tensor) -> Tensor:
    """The gradient as the method wants it: as is if it upcasts chunk-wise itself, else fp32."""
    return grad if method.accepts_low_precision_grad else grad.float()
