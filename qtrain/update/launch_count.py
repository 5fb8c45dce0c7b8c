"""Device operations (kernel launches on CUDA) of one training step, counted on the CPU with the code taking its
CUDA decisions: the machinery of tools/count_launches.py (its docstring says what counts as a launch) and of the
tests that check what a captured step launches (tests/test_capturable.py, tests/test_count_launches.py).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype
from qtrain.core.sync_probe import SyncCount, cpu_syncs
from qtrain.model.builder import build_model, enable_activation_checkpointing
from qtrain.model.loss import lm_loss
from qtrain.quant import dispatch, triton_kernels
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release

NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "resize_",
             "resize_as_", "_local_scalar_dense", "lift_fresh", "detach", "record_stream", "_unsafe_view",
             "_reshape_alias"}  # + every op of the profiler:: namespace (record_function markers)
PHASES = ("forward + loss", "backward (autograd)", "int8 updates", "float updates", "finish_step",
          "grad norm", "loop")


def launches(func) -> bool:
    """Whether an ATen op launches device work: not a view/alias, allocation or metadata op."""
    namespace, _, name = func._schema.name.rpartition("::")
    if name in NO_LAUNCH or namespace == "profiler":
        return False
    returns = func._schema.returns
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class LaunchCounter(TorchDispatchMode):
    """Counts launching ATen ops (and Triton launches, added by `counting_triton`) by phase and by op."""

    def __init__(self):
        super().__init__()
        self.phase = "forward + loss"
        self.by_phase: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.by_phase_op: Counter[tuple[str, str]] = Counter()
        self.syncing_ops: Counter[str] = Counter()

    def add(self, op: str, n: int = 1) -> None:
        self.by_phase[self.phase] += n
        self.by_op[op] += n
        self.by_phase_op[self.phase, op] += n

    def triton(self, name: str, args: tuple, kwargs: dict) -> None:
        """One intercepted Triton launch (its arguments, for subclasses that record them)."""
        self.add(f"triton::{name}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if func._schema.name.endswith("_local_scalar_dense"):
            self.syncing_ops[name] += 1
        if launches(func):
            self.add(func._schema.name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


class CudaDecisions:
    """Inside: the dispatchers choose as for CUDA tensors and every Triton launch counts in `counter`."""

    def __init__(self, counter: LaunchCounter | None):
        self.counter = counter

    def __enter__(self):
        from triton.runtime.jit import KernelInterface

        self.saved = [(dispatch, "use_triton", dispatch.use_triton), (dispatch, "_use_triton", dispatch._use_triton),
                      (KernelInterface, "__getitem__", KernelInterface.__getitem__)]

        def use_triton(backend, tensors, problems, what):
            if backend not in dispatch.BACKENDS:
                raise ValueError(f"backend = {backend!r}")
            return backend != "torch" and not problems

        def _use_triton(backend, tensors, codes, scale, offset, group_size):
            if backend == "torch":
                return False
            try:
                triton_kernels.check_supported(codes, scale, offset, group_size)
            except ValueError:
                return False
            return True

        counter = self

        def launch(kernel, grid):
            name = getattr(getattr(kernel, "fn", kernel), "__name__", type(kernel).__name__)

            def counted(*args, **kwargs):
                if counter.counter is not None:
                    counter.counter.triton(name, args, kwargs)
            return counted

        dispatch.use_triton, dispatch._use_triton = use_triton, _use_triton
        KernelInterface.__getitem__ = launch
        return self

    def __exit__(self, *exc):
        for owner, attr, value in self.saved:
            setattr(owner, attr, value)


def step_function(cfg: TrainConfig, counter_ref: list, device: torch.device | str = "cpu"):
    """fit()'s per-step device work for cfg on device, with phases marked on counter_ref[0] when set."""
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    updater = build_updater(model, cfg)

    def in_phase(phase, fn):
        def wrapped(*args, **kwargs):
            counter = counter_ref[0]
            if counter is None:
                return fn(*args, **kwargs)
            before, counter.phase = counter.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = before
        return wrapped

    # wrapped before attach_release binds them to the hooks
    updater.update_int8 = in_phase("int8 updates", updater.update_int8)
    updater.update_float = in_phase("float updates", updater.update_float)
    finish = in_phase("finish_step", updater.finish_step)
    grad_norm = updater.measure_grad_norm()  # as fit: the norm measured while the updates run
    grad_norm.measure = in_phase("grad norm", grad_norm.measure)  # its own launches (fused ones cost none)
    take = in_phase("grad norm", grad_norm.take)
    if cfg.train.release:
        attach_release(updater)
    dtype = autocast_dtype(cfg.train.dtype, torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), generator=gen
                          ).to(device) for _ in range(2))

    def step():
        counter = counter_ref[0]
        if counter is not None:
            counter.phase = "loop"  # begin_step writes the step's device values (qtrain.core.step_state)
        updater.begin_step(cfg.optim.lr, cfg.optim.float_lr_value)
        step_loss = torch.zeros((), device=device)
        if counter is not None:
            counter.phase = "forward + loss"
        loss = lm_loss(model, x, y, dtype)
        if counter is not None:
            counter.phase = "backward (autograd)"
        loss.backward()
        if counter is not None:
            counter.phase = "loop"
        step_loss += loss.detach()
        finish()
        take()

    return step


def count_step(cfg: TrainConfig, steps: int) -> tuple[LaunchCounter, SyncCount]:
    """Launches and syncs of step number `steps` of a fresh trainer for cfg."""
    ref: list = [None]
    step = step_function(cfg, ref)
    with CudaDecisions(None) as decisions:
        for _ in range(steps - 1):
            step()
        counter = LaunchCounter()
        decisions.counter = ref[0] = counter

        def counted():
            with counter:
                step()

        syncs = cpu_syncs(counted)
    return counter, syncs


def recipe_cfg(recipe: str, overrides: list[str], layers: int, seq_len: int) -> TrainConfig:
    base = TrainConfig.from_toml(find_recipe(recipe), overrides)
    return base.apply_overrides([f"model.num_layers={layers}", "train.batch_size=1", f"train.seq_len={seq_len}",
                                 "train.device=cpu", "train.grad_accum_steps=1"])
