"""`qtrain train`: a recipe and a run directory -> data, model, updater, resumed state -> the loop.

The setup order matters: the run directory is locked before anything is written into it; a resume is
checked against the recipe before any state is loaded, and recipe.toml is (re)written only once the resume
is accepted; the checkpoint's data identity is checked once the data is prepared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtrain.build import build
from qtrain.checkpoint import TrainingProgress, checkpoint_dirs, load_latest
from qtrain.config import TrainConfig
from qtrain.data import prepare_data
from qtrain.device import autocast_dtype, resolve_device
from qtrain.errors import TrainingError
from qtrain.estimate import estimate
from qtrain.loop import RunResult, fit
from qtrain.release import attach_release
from qtrain.run_dir import RunDir
from qtrain.run_state import check_resumable, check_same_data, load_run, save_run


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> RunResult:
    """Run (or resume) training as the recipe says; returns the evaluation history."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.dtype, device)
    with RunDir(run_dir) as run:
        existing = checkpoint_dirs(run_dir)
        if existing and not resume:
            raise TrainingError(f"{run_dir} already holds checkpoints (latest {existing[0].name}); pass --resume to "
                                f"continue it, or --out NEW_DIR for a new run")
        found = load_latest(run_dir, accept=lambda path, meta: check_resumable(path, meta, cfg)) if resume else None
        if resume and found is None:
            print(f"note: --resume given but {run_dir} has no checkpoint yet; starting from step 0")
        run.write_recipe(cfg.to_toml())  # only now: a refused resume leaves the run's recipe as it was

        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, run_dir)
        if found is not None:
            check_same_data(found[0], found[2], data.identity())
        torch.manual_seed(cfg.train.seed)
        built = build(cfg, device)
        model, updater = built.model, built.updater
        sampler = data.sampler(cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
        progress, last_saved = TrainingProgress(), None
        if found is not None:
            last_saved, tensors, meta = found
            progress = load_run(last_saved, tensors, meta, model, updater, cfg, device)
            del tensors, found  # the CPU copy of the checkpoint is not needed past this point
            sampler.load_state_dict(progress.sampler)
            print(f"resumed from {last_saved} at step {progress.step}")
        if cfg.train.release:
            attach_release(updater)
        predicted = _cuda_estimate(cfg, device)

        def save(p: TrainingProgress) -> Path:
            return save_run(run_dir, model, updater, p, cfg, device, data.identity())

        return fit(cfg, run_dir, model, updater, data, sampler, progress, device, dtype, save, last_saved, quiet,
                   predicted)


def _cuda_estimate(cfg: TrainConfig, device: torch.device):
    """The memory estimate printed before the first step on CUDA (fit prints the measurement after a few)."""
    if device.type != "cuda":
        return None
    predicted = None
    try:
        predicted = estimate(cfg, "cuda")
        print(f"qtrain estimate: peak allocated {predicted.peak_allocated / 2**30:.2f} GiB, reserved "
              f"{predicted.peak_reserved / 2**30:.2f} GiB (persistent {predicted.persistent_bytes / 2**30:.2f} GiB)")
    except Exception as e:  # the estimate is a report: never let it stop a run
        print(f"note: memory estimate unavailable ({type(e).__name__}: {e}); training continues")
    torch.cuda.reset_peak_memory_stats(device)
    return predicted
