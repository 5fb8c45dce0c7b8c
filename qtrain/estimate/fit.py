"""`qtrain estimate --gpu-gib N`: does the recipe fit, and if not, the first recipe changes that make it fit."""

from __future__ import annotations

from qtrain.config.recipe import TrainConfig
from qtrain.estimate.breakdown import Breakdown, GiB
from qtrain.estimate.memory import estimate


def _changes_to_try(cfg: TrainConfig) -> list[list[str]]:
    """Recipe changes for --gpu-gib, in the order they are tried (each added to the ones before)."""
    steps: list[list[str]] = []
    if not cfg.train.activation_checkpointing:
        steps.append(["train.activation_checkpointing=true"])
    B = cfg.train.batch_size
    while B > 1:
        B //= 2
        steps.append([f"train.batch_size={B}"])
    T = cfg.train.seq_len
    while T > 64:
        T //= 2
        steps.append([f"train.seq_len={T}"])
    if cfg.quant.meta_dtype != "bfloat16":
        steps.append(["quant.meta_dtype=bfloat16"])
    if cfg.model.float_dtype != "bfloat16":
        steps.append(["model.float_dtype=bfloat16"])
    if "same_as_matrices" != cfg.optim.embedding_optimizer or "same_as_matrices" != cfg.optim.lm_head_optimizer:
        steps.append(["optim.embedding_optimizer=same_as_matrices", "optim.lm_head_optimizer=same_as_matrices"])
    return steps


def fit_gpu(cfg: TrainConfig, gpu_gib: float, b: Breakdown) -> dict:
    """Does the recipe fit in gpu_gib (total on the GPU)? If not, the first change list that fits.

    Every trial is estimated for the run `b` describes: its device, processes and FSDP sharding."""
    budget = int(gpu_gib * GiB)
    fit = {"gpu_gib": gpu_gib, "fits": b.total_on_gpu <= budget, "total_on_gpu": b.total_on_gpu,
           "set": [], "total_after": b.total_on_gpu}
    if fit["fits"]:
        return fit

    def trial(changes: list[str]) -> Breakdown:
        return estimate(cfg.apply_overrides(changes), b.device_type, nproc=b.nproc, fsdp=b.fsdp)

    changes: list[str] = []
    for step in _changes_to_try(cfg):
        keys = {c.split("=")[0] for c in step}
        changes = [c for c in changes if c.split("=")[0] not in keys] + step
        fit["total_after"] = trial(changes).total_on_gpu
        if fit["total_after"] <= budget:
            break
    else:
        fit["set"] = None  # nothing tried fits
        return fit
    for change in list(changes[:-1]):  # drop the earlier changes the fit does not need (the last one it does)
        fewer = [c for c in changes if c != change]
        total = trial(fewer).total_on_gpu
        if total <= budget:
            changes, fit["total_after"] = fewer, total
    fit["set"] = changes
    return fit


def format_fit(fit: dict) -> str:
    head = f"\n--gpu-gib {fit['gpu_gib']:g}: "
    if fit["fits"]:
        return head + f"fits ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU)"
    if fit["set"] is None:
        return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU) and no tried change fits; "
                       f"the leanest tried needs {fit['total_after'] / GiB:.2f} GiB")
    flags = " ".join(f"--set {c}" for c in fit["set"])
    return head + (f"does not fit ({fit['total_on_gpu'] / GiB:.2f} GiB on the GPU); with these changes it "
                   f"needs {fit['total_after'] / GiB:.2f} GiB:\n  {flags}")
