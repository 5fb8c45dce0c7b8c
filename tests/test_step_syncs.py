"""No host-device synchronisation in a training step, for every shipped recipe: checked on the CPU.

On CUDA a step must not wait for the GPU: no tensor value read on the host (.item(), float(t), bool(t),
.tolist()) and no explicit synchronize (torch.cuda.synchronize, current_stream().synchronize(),
Event.synchronize, or a library helper around them such as bitsandbytes' `sync_gpu`, which its 8-bit
optimizers called after every parameter: 67 syncs per 7B step before qtrain stepped them itself).
qtrain/core/sync_probe.py counts both on the CPU (see its docstring); here around the second release step (the
first creates lazy state) of each recipes/*.toml, shrunk to tiny widths by overrides but with its own
optimizer choices (method, float optimizer, float dtype, lm_head / embedding optimizers, checkpointing,
release), bf16 autocast as on CUDA. The 7B recipes also run through the Triton kernels (Triton's
interpreter), so the host code of the CUDA path is covered too. On the GPU itself tools/bench_step.py
checks the same (sync_probe.sync_free: set_sync_debug_mode("error") plus the explicit-sync count).
"""

from pathlib import Path

import pytest
import torch
from conftest import release_trainer

from qtrain.config.recipe import TrainConfig
from qtrain.core.sync_probe import cpu_syncs, explicit_syncs
from qtrain.model.loss import lm_loss

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.toml"))
SHRINK = ["model.init=", "model.hidden_size=128", "model.intermediate_size=256", "model.num_heads=2",
          "model.num_kv_heads=0", "model.head_size=0", "model.num_layers=2", "model.vocab_size=256",
          "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=16", "train.device=cpu",
          "train.dtype=bfloat16", "train.grad_accum_steps=1"]


def shrunk(path: Path, extra=()) -> TrainConfig:
    cfg = TrainConfig.from_toml(path)
    rank = [f"optim.args.rank={min(4, cfg.optim.args['rank'])}"] if "rank" in cfg.optim.args else []
    return TrainConfig.from_toml(path, SHRINK + rank + list(extra))


def syncs_of_a_release_step(cfg: TrainConfig):
    model, updater = release_trainer(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len),
                      generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step():
        updater.begin_step(0.01)
        lm_loss(model, x, x, torch.bfloat16).backward()
        updater.finish_step()

    step()  # creates the lazy optimizer states
    count = cpu_syncs(step)
    changed = sum(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert changed >= len(updater.int8) + len(updater.floats)  # the step did update every tensor
    return count, updater


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_release_step_of_every_shipped_recipe_makes_no_sync(recipe):
    count, _ = syncs_of_a_release_step(shrunk(recipe))
    assert count.total == 0, f"{recipe.stem}: {count} syncs: " + "; ".join(count.where[:5])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem in ("7b", "7b-8gb")], ids=lambda p: p.stem)
def test_the_triton_path_makes_no_sync_either(recipe):
    from qtrain.quant import triton_kernels

    if not triton_kernels.interpret_mode():
        pytest.skip("Triton compiled (a GPU machine): tools/bench_step.py checks the CUDA step itself")
    smaller = ["model.hidden_size=64", "model.intermediate_size=128", "model.vocab_size=128", "model.num_layers=1",
               "quant.group_size=64", "train.batch_size=1", "train.seq_len=8"]  # the interpreter is slow
    count, _ = syncs_of_a_release_step(shrunk(recipe, smaller + ["quant.kernels=triton"]))
    assert count.total == 0, f"{recipe.stem}: {count} syncs: " + "; ".join(count.where[:5])


def test_the_probe_sees_explicit_syncs_and_host_reads():
    """The detector itself: each kind of sync it must catch, counted once, on the CPU."""
    import bitsandbytes as bnb

    def explicit():
        torch.cuda.synchronize()
        torch.cuda.Stream.synchronize(None)  # current_stream().synchronize() on CUDA
        torch.cuda.Event.synchronize(None)

    assert cpu_syncs(explicit).explicit == 3
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = bnb.optim.Adam8bit([p], lr=1e-3)  # its step calls sync_gpu(p) after the parameter
    got = cpu_syncs(opt.step)
    assert got.explicit == 1 and "sync_gpu" in got.where[0]
    t = torch.ones(3)
    reads = cpu_syncs(lambda: (t.sum().item(), float(t[0]), bool(t[1]), t.tolist()))
    assert reads.implicit == 4 and reads.explicit == 0
    with explicit_syncs(calls_cuda=False) as outer:  # sync_gpu -> torch.cuda.synchronize counts once
        from bitsandbytes.utils import sync_gpu

        sync_gpu(torch.empty(0, device="meta"))
    assert outer.explicit == 1
