"""A capturable step: between two steps, only device tensors change, never a number a kernel takes.

A CUDA graph records every launch with its arguments once; replaying it with a per-step Python number (the
LR, an SR seed, a bias correction, `first`) would silently freeze that number. Here, on the CPU, the code
takes its CUDA decisions (tools/count_launches.py's CudaDecisions: Triton launches intercepted, not run) and
every launch of two consecutive release steps is recorded with its non-tensor arguments (tensors by dtype
and shape, which must not change either); the two records must be identical although the LR (warmup), the
step and every SR seed differ. What runs before the step (Updater.begin_step writing the device values,
redrawing kept projections) is outside a captured region and not recorded.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import release_trainer
from torch import Tensor

from qtrain.config.recipe import ConfigError, TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.seeding import name_uid, update_seed
from qtrain.core.step_state import StepState, StepValue
from qtrain.errors import TrainingError
from qtrain.model.builder import build_model, forward_draws_random_numbers
from qtrain.model.loss import lm_loss
from qtrain.optim.apollo import step_constants
from qtrain.optim.apollo_kernels import scaling_chain_triton
from qtrain.optim.base import Update
from qtrain.optim.float_update import float_update_triton_, round_to_bf16
from qtrain.quant import triton_kernels
from qtrain.train.schedule import lr_at
from qtrain.update import launch_count as cl
from qtrain.update import step_graph
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release
from qtrain.update.step import train_step

TINY = ["model.init=", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2",
        "model.num_kv_heads=0", "model.head_size=0", "model.num_layers=2", "model.vocab_size=128",
        "model.max_seq_len=16", "quant.group_size=64", "train.batch_size=1", "train.seq_len=8",
        "train.dtype=bfloat16", "train.device=auto", "train.steps=100"]  # warmup: the LR changes every step
DTYPE = torch.bfloat16


def form(v):
    """What a launch is given, as data to compare: tensors by dtype and shape, numbers as they are."""
    if isinstance(v, Tensor):
        return ("tensor", v.dtype, tuple(v.shape))
    if isinstance(v, torch.Generator):
        return ("generator", v.initial_seed())
    if isinstance(v, (list, tuple)):
        return type(v)(form(x) for x in v)
    if isinstance(v, dict):
        return {k: form(x) for k, x in v.items()}
    return v


class ArgRecorder(cl.LaunchCounter):
    """Every launching ATen op and every Triton launch, with the forms of its arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if cl.launches(func):
            self.calls.append((func._schema.name, form((args, kwargs or {}))))
        return func(*args, **(kwargs or {}))

    def triton(self, name, args, kwargs):
        self.calls.append((f"triton::{name}", form((args, kwargs))))


def recorded_steps(recipe: str, extra=(), steps=(3, 4)):
    """The records of release steps `steps` (consecutive) of `recipe` at tiny widths, as fit runs them."""
    cfg = TrainConfig.from_toml(find_recipe(recipe), TINY + list(extra))
    model, updater = release_trainer(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
    records = {}
    with cl.CudaDecisions(None) as decisions:
        for k in range(max(steps)):
            lr = lr_at(k, cfg.optim.lr, cfg.train.steps, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio)
            updater.begin_step(lr)  # outside the captured region: writes the step's device values
            recorder = decisions.counter = ArgRecorder() if k + 1 in steps else None
            if recorder is not None:
                with recorder:
                    (lm_loss(model, x, x, DTYPE)).backward()
                    updater.finish_step()
                records[k + 1] = (lr, recorder.calls)
            else:
                lm_loss(model, x, x, DTYPE).backward()
                updater.finish_step()
    return records, updater


def differences(a: list, b: list) -> list[str]:
    out = [f"{len(a)} vs {len(b)} launches"] if len(a) != len(b) else []
    out += [f"{x[0]}: {x[1]} vs {y[1]}" for x, y in zip(a, b) if x != y]
    return out


def test_device_seeds_are_the_host_seeds():
    names = ["model.layers.0.mlp.up_proj", "lm_head.weight", "fused_adamw/torch.bfloat16"]
    state = StepState("cpu", 2**40 + 7, names)
    for t in (1, 2, 200, 150_000, 2**35):
        state.set(t, 0.01, 0.02)
        assert state.seeds.tolist() == [update_seed(2**40 + 7, name_uid(n), t - 1) for n in names]
        assert state.seed(names[1]) == StepValue(state.seeds[1].item(), state.seeds[1])
    assert state.lr.dtype == torch.float64 and state.lr.item() == 0.01  # fp64: the host's Adam arithmetic


@pytest.mark.parametrize("gap", [200, 3], ids=["in-a-window", "new-projection-window"])
def test_a_7b_8gb_step_changes_only_device_tensors_between_steps(gap):
    """7b-8gb (APOLLO-Mini everywhere, bf16 floats with SR, checkpointing, fused AdamW norms) with cuda_graph:
    two steps with different LRs and seeds launch the same kernels with the same numbers; with gap 3, step 4
    also starts a new projection window (P redrawn before the step, in place)."""
    records, updater = recorded_steps("7b-8gb", ["train.cuda_graph=true", f"optim.args.update_proj_gap={gap}"])
    (lr3, a), (lr4, b) = records[3], records[4]
    assert lr3 != lr4 and updater.clock.host_t == 4
    assert sum(op.startswith("triton::") for op, _ in a) >= 3 * 7 * 2  # the CUDA path ran
    assert not [op for op, args in a if "generator" in repr(args)], "a per-call generator cannot be captured"
    assert a == b, differences(a, b)[:5]


def test_the_recorder_sees_a_host_lr(monkeypatch):
    """The check above fails on the old code: a Python LR reaching the kernels differs between the steps."""
    monkeypatch.setattr(StepState, "lr_value", property(lambda self: self.host_lr))
    records, _ = recorded_steps("7b-8gb", ["train.cuda_graph=true"])
    diff = differences(records[3][1], records[4][1])
    assert diff and all(d.startswith(("triton::_update_kernel", "triton::_float_update_kernel")) for d in diff)


def test_a_7b_step_changes_only_device_tensors_between_steps():
    """7b keeps the papers' Adam for its fp32 embedding and lm_head: with cuda_graph they take qtrain's 8-bit Adam
    (qtrain.optim.adam8bit), whose kernel reads the LR and the step on the device (bitsandbytes' took them as
    host numbers, and the config refused cuda_graph for 7b)."""
    records, updater = recorded_steps("7b", ["train.cuda_graph=true"])
    (lr3, a), (lr4, b) = records[3], records[4]
    assert lr3 != lr4
    assert [op for op, _ in a].count("triton::_adam8bit_kernel") == 2  # embedding and lm_head
    assert not [op for op, _ in a if op.startswith("bitsandbytes::")]
    assert a == b, differences(a, b)[:5]


def test_the_8bit_adam_of_7b_reads_the_step_on_the_device(monkeypatch):
    """The check above fails when the 8-bit Adam's LR reaches its kernel as a host number."""
    from qtrain.optim import adam8bit
    real = adam8bit.adam8bit_update_triton_
    monkeypatch.setattr(adam8bit, "adam8bit_update_triton_",
                        lambda w, g, st, lr, *rest: real(w, g, st, lr.item(), *rest))
    records, _ = recorded_steps("7b", ["train.cuda_graph=true"])
    diff = differences(records[3][1], records[4][1])
    assert diff and all(d.startswith("triton::_adam8bit_kernel") for d in diff), diff[:3]


def test_cuda_graph_with_adam_floats_needs_the_8bit_adam():
    TrainConfig.from_toml(find_recipe("7b"), ["train.cuda_graph=true"])  # accepted: lm_head/embedding "adam"
    with pytest.raises(ConfigError, match=r'cuda_graph = true needs optim.float_optimizer = "adam8bit" for an Adam'):
        TrainConfig.from_toml(find_recipe("7b"), ["train.cuda_graph=true", "optim.float_optimizer=adamw"])


def test_refusals_say_what_to_change():
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), ["train.cuda_graph=true"])
    with pytest.raises(TrainingError, match="runs in one process, not 2"):
        step_graph.CapturedStep(None, None, torch.device("cuda"), DTYPE, world_size=2)
    for override, needs in [("train.release=false", "train.release = true"),
                            ("quant.kernels=torch", 'quant.kernels = "auto"'),
                            ("optim.method=galore", 'optim.method = "apollo"')]:
        with pytest.raises(ConfigError, match=re.escape(f"cuda_graph = true needs {needs}")):
            cfg.apply_overrides([override])
    cfg.apply_overrides(["train.device=cpu"])  # a CPU run of a cuda_graph recipe steps eagerly


def test_off_cuda_the_captured_step_is_the_eager_step():
    """The 7B recipes ship cuda_graph = true: on a CPU every call runs the eager step, with its numbers."""
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY + ["train.cuda_graph=true"])
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
    losses = []
    for captured in (True, False):
        model, updater = release_trainer(cfg)
        step = step_graph.CapturedStep(model, updater, torch.device("cpu"), DTYPE) if captured else None
        run = []
        for _ in range(step_graph.WARMUP_STEPS + 2):
            updater.begin_step(0.01)
            run.append(step(x, x) if step else train_step(model, updater, [(x, x)], DTYPE))
        assert step is None or (step.graph is None and not step.settling)
        losses.append(torch.stack(run))
    assert torch.equal(*losses)


def test_the_warmup_steps_share_one_side_stream(monkeypatch):
    """Every warm-up step runs on the same side stream (a new stream per step kept each step's transients in
    its own pool: up to 3x the step's transient memory during warm-up); the capture runs outside it."""
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY + ["train.cuda_graph=true"])
    model, updater = release_trainer(cfg)
    fake_capture(monkeypatch, cl.LaunchCounter())
    step = step_graph.CapturedStep(model, updater, torch.device("cuda"), DTYPE)
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
    for k in range(step_graph.WARMUP_STEPS + 2):
        assert step.settling == (k <= step_graph.WARMUP_STEPS)
        updater.begin_step(0.01)
        step(x, x)
    assert len(FakeStream.made) == 1
    assert FakeStream.used == FakeStream.made * step_graph.WARMUP_STEPS


class FakeGraph:
    """torch.cuda.CUDAGraph's interface on the CPU: counts replays."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def fake_capture(monkeypatch, inside: cl.LaunchCounter) -> list:
    """torch.cuda.graph(g) on the CPU: the step runs eagerly, its launches counted in `inside` as "captured"."""
    captures = []

    class capture:
        def __init__(self, graph):
            captures.append(graph)

        def __enter__(self):
            inside.__enter__()

        def __exit__(self, *exc):
            inside.__exit__(*exc)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream.default)
    monkeypatch.setattr(torch.cuda, "stream", FakeStream.entered)
    FakeStream.made.clear()
    FakeStream.used.clear()
    return captures


class FakeStream:
    """torch.cuda.Stream on the CPU: records every stream made and every stream a step runs on."""

    made: list = []
    used: list = []
    default = None

    def __init__(self, default: bool = False):
        if not default:
            FakeStream.made.append(self)

    def wait_stream(self, other):
        pass

    @staticmethod
    @__import__("contextlib").contextmanager
    def entered(stream):
        FakeStream.used.append(stream)
        yield


FakeStream.default = FakeStream(default=True)


def test_checkpointing_under_cuda_graph_never_touches_the_rng(monkeypatch):
    """7b-8gb ships activation checkpointing; torch's checkpoint saves and restores the RNG states by default
    (torch.cuda.get_rng_state() raises during a CUDA-graph capture). Llama's forward draws no random number, so
    the checkpoint must not read or write any RNG state: here every RNG state accessor raises, through the warm-up
    steps, the capture and the replays, while each block is still recomputed in backward."""
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY + ["train.cuda_graph=true"])
    assert cfg.train.activation_checkpointing
    model, updater = release_trainer(cfg)
    assert not forward_draws_random_numbers(model)
    forwards = []
    for block in model.model.layers:
        block.mlp.register_forward_pre_hook(lambda module, args: forwards.append(module))

    def refuse(*args, **kwargs):
        raise AssertionError("an RNG state was read or written during the step")

    for owner in (torch, torch.cuda, torch.random):
        for name in ("get_rng_state", "set_rng_state"):
            monkeypatch.setattr(owner, name, refuse)  # torch.random.fork_rng(enabled=True) reads them too
    monkeypatch.setattr(torch.utils.checkpoint, "get_device_states", refuse)
    captures = fake_capture(monkeypatch, cl.LaunchCounter())
    step = step_graph.CapturedStep(model, updater, torch.device("cuda"), DTYPE)
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(step_graph.WARMUP_STEPS + 2):
        updater.begin_step(0.01)
        losses.append(step(x, x).item())
    assert len(captures) == 1 and captures[0].replays == 2
    # eager warm-up steps and the captured one: each block runs forward twice (the recompute in backward)
    assert len(forwards) == 2 * cfg.model.num_layers * (step_graph.WARMUP_STEPS + 1)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_dropout_keeps_the_rng_states_saved():
    """The states are dropped only because nothing draws: a model with dropout keeps torch's default."""
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY)
    model = build_model(cfg.model, cfg.quant, "cpu", seed=0)
    assert not forward_draws_random_numbers(model)
    model.config.attention_dropout = 0.1
    assert forward_draws_random_numbers(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert forward_draws_random_numbers(model)


def test_after_warmup_each_step_is_one_replay_and_the_capture_covers_the_step(monkeypatch):
    """CapturedStep on the CPU with a stand-in graph: the warm-up steps run eagerly, then every launch of the step
    happens inside the capture region, and each later step is the input copies, one replay and the loss copy;
    the host counters the replay skips (updater.step, APOLLO's step) advance as if the Python had run."""
    cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY + ["train.cuda_graph=true"])
    model = build_model(cfg.model, cfg.quant, "cpu", seed=0)
    model.train()
    updater = build_updater(model, cfg)
    attach_release(updater)
    inside = cl.LaunchCounter()
    captures = fake_capture(monkeypatch, inside)
    step = step_graph.CapturedStep(model, updater, torch.device("cuda"), DTYPE)
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
    outside = []
    for k in range(step_graph.WARMUP_STEPS + 3):
        updater.begin_step(0.01)
        counter = cl.LaunchCounter()
        with counter:
            step(x, x)
        outside.append(counter.total)
        assert updater.step == k + 1
    assert len(captures) == 1 and captures[0].replays == 3
    assert inside.total > 100  # forward, backward, every update: all inside the capture region
    assert outside[step_graph.WARMUP_STEPS + 1:] == [3, 3]  # two input copies and the loss copy per replay
    apollo_steps = {st["step"] for st in updater.state.values()}
    assert apollo_steps == {updater.step}


def test_kept_projections_are_the_drawn_ones():
    """cuda_graph keeps each P and redraws it in place in begin_step when its window ends: the same numbers as
    drawing it inside every update (CPU reference path), across window boundaries."""
    weights = []
    for keep in (False, True):
        cfg = TrainConfig.from_toml(find_recipe("7b-8gb"), TINY + ["optim.args.update_proj_gap=2"])
        model = build_model(cfg.model, cfg.quant, "cpu", seed=0)
        updater = build_updater(model, cfg)
        updater.matrix_method.keep_projections = keep
        attach_release(updater)
        x = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len), generator=torch.Generator().manual_seed(0))
        for k in range(5):
            updater.begin_step(0.01 * (k + 1))
            lm_loss(model, x, x, DTYPE).backward()
            updater.finish_step()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        if keep:
            buffers = {uid: p.data_ptr() for uid, (_, p) in updater.matrix_method._kept().items()}
            updater.begin_step(0.01)  # step 6 starts window 2: redrawn in place
            assert {uid: p.data_ptr() for uid, (_, p) in updater.matrix_method._kept().items()} == buffers
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


@pytest.mark.skipif(not triton_kernels.interpret_mode(), reason="Triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_kernels_reading_device_values_give_the_host_values_bits():
    """The int8 update, float update and APOLLO chain kernels: a device LR / seed / step gives the same bits as
    the same host numbers (weight decay 0: with a device LR, 1 - lr·wd is formed in fp32, not fp64)."""
    gen = torch.Generator().manual_seed(0)
    clock = StepState("cpu", 3, ["w", "f"])
    for t, lr in [(1, 1e-3), (7, 3.7e-3)]:
        clock.set(t, lr, lr)
        codes = torch.randint(0, 256, (8, 64), generator=gen, dtype=torch.uint8)
        scale, offset = torch.rand(8, generator=gen) * 1e-2, torch.randn(8, generator=gen) * 1e-2
        grad, s = torch.randn(8, 64, generator=gen), torch.rand((), generator=gen)
        host, dev = ([x.clone() for x in (codes, scale, offset)] for _ in range(2))
        triton_kernels.int8_scaled_update_triton_(*host, 64, grad, s, lr, 0.0, clock.seed("w").host)
        triton_kernels.int8_scaled_update_triton_(*dev, 64, grad, s, clock.lr, 0.0, clock.seed("w").device)
        assert all(torch.equal(a, b) for a, b in zip(host, dev))
        w = torch.randn(8, 64, generator=gen).bfloat16()
        w_host, w_dev = w.clone(), w.clone()
        upd = Update(grad_scale=s)
        float_update_triton_(w_host, upd, grad, lr, 0.0, clock.seed("f").host)
        float_update_triton_(w_dev, upd, grad, clock.lr, 0.0, clock.seed("f").device)
        assert torch.equal(w_host, w_dev)
        for mode in ("inside", "outside"):
            hyper = dict(betas=(0.9, 0.999), eps=1e-8, scale=128.0, scale_type="tensor", bias_correction=mode)
            r, col_sq = torch.randn(1, 64, generator=gen), torch.rand(64, generator=gen)
            state = [torch.rand(1, 64, generator=gen), torch.rand(1, 64, generator=gen), torch.rand(())]
            a, b = [x.clone() for x in state], [x.clone() for x in state]
            f_host = scaling_chain_triton(r, col_sq, *a, t, **hyper)
            constants = step_constants(clock.t, (0.9, 0.999), 128.0, mode)
            f_dev = scaling_chain_triton(r, col_sq, *b, 99, step_constants=constants, **hyper)  # 99: not read
            assert torch.equal(f_host, f_dev) and all(torch.equal(x, y) for x, y in zip(a, b)), (t, mode)


@pytest.mark.skipif(not triton_kernels.interpret_mode(), reason="Triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_the_device_seeded_bf16_rounding_is_stochastic_rounding():
    """round_to_bf16's kernel (the fused AdamW's SR on CUDA): each value becomes one of its two bf16 neighbours,
    unbiased on average, the same for the same device seed and another for another seed."""
    x = torch.full((4096,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of the way from 1 to the next bf16 value
    clock = StepState("cpu", 0, ["a", "b"])
    clock.set(1, 0.0, 0.0)
    a, a2, b = (round_to_bf16(x, clock.seed(n), "triton").float() for n in ("a", "a", "b"))
    assert set(a.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((a.mean() - x.mean()).item()) < 4 * 2**-7 * (0.125 * 0.875 / 4096) ** 0.5
    assert torch.equal(a, a2) and not torch.equal(a, b)
