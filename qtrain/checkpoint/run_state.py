"""What a checkpoint of a run holds, and whether a recipe may resume it.

A checkpoint is the model's tensors, the Updater's state, the training progress (step, tokens, sampler,
RNG) and, in its meta, the recipe and the identity of the data it trained on (corpus and tokenizer
hashes). Everything here turns those objects into checkpoint.py's tensors + JSON and back.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch

from qtrain.checkpoint.store import (
    TrainingProgress,
    is_sharded,
    load_shards,
    save_checkpoint,
    save_sharded_checkpoint,
)
from qtrain.config.recipe import TrainConfig
from qtrain.core.statetree import flatten, unflatten
from qtrain.errors import TrainingError
from qtrain.model.builder import tied_aliases
from qtrain.update.updater import Updater

# Sections whose every key fixes a tensor shape or the meaning of the stored numbers: they must not change
# on resume, except the keys that only pick kernels (same numbers in the same layout).
SHAPE_SECTIONS = ("model", "quant")
FREE_ON_RESUME = {("quant", "kernels"), ("quant", "matmul")}
# Keys that decide which optimizer state exists: a change cannot be loaded at all.
STATE_KEYS = (("optim", "method"), ("optim", "float_optimizer"), ("optim", "lm_head_optimizer"),
              ("optim", "embedding_optimizer"))


def _rng_state(device: torch.device) -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def _set_rng_state(rng: dict[str, str], device: torch.device) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(rng["cpu"]))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(decode(rng["cuda"]), device)


def save_run(run_dir: Path, model, updater: Updater, progress: TrainingProgress, cfg: TrainConfig,
             device: torch.device, data_identity: dict[str, str], sharded: bool = False) -> Path:
    """Checkpoint the run at progress.step; data_identity: {"corpus": sha, "tokenizer": sha} of what it trains on.

    sharded: model and updater hold DTensors (qtrain.parallel.fsdp.ShardedTraining.sharded_state) and every rank
    calls this: a torch.distributed.checkpoint directory, each rank writing its blocks.
    """
    aliases = set() if sharded else tied_aliases(model)  # a tied lm_head is the embedding: stored once
    tensors = {f"model/{k}": v for k, v in model.state_dict().items() if k not in aliases}
    optim_skeleton = flatten(updater.state_dict(), "optim", tensors)
    progress.rng = _rng_state(device)
    meta = {"progress": progress.state_dict(), "optim": optim_skeleton, "recipe": cfg.to_dict(),
            "device_type": device.type, "data": dict(data_identity)}
    if sharded:
        return save_sharded_checkpoint(run_dir, progress.step, tensors, meta, cfg.train.keep_last)
    return save_checkpoint(run_dir, progress.step, tensors, meta, cfg.train.keep_last)


def _differs(now, saved) -> bool:
    return now != saved and not (isinstance(now, tuple) and list(now) == saved)


def check_resumable(path: Path, meta: dict, cfg: TrainConfig) -> None:
    """Raise TrainingError, before any state is loaded, if cfg cannot continue the checkpoint at path."""
    saved = meta["recipe"]
    for section in SHAPE_SECTIONS:
        for key, value in saved[section].items():
            now = getattr(getattr(cfg, section), key)
            if (section, key) not in FREE_ON_RESUME and _differs(now, value):
                raise TrainingError(f"cannot resume {path}: [{section}] {key} was {value!r} in the checkpoint "
                                    f"but is {now!r} now; the model shape must not change on resume. Restore it "
                                    f"or start a new run with --out NEW_DIR")
    for section, key in STATE_KEYS:
        value, now = saved[section][key], getattr(getattr(cfg, section), key)
        if _differs(now, value):
            raise TrainingError(f"cannot resume {path}: [{section}] {key} was {value!r} in the checkpoint but is "
                                f"{now!r} now, and the saved optimizer state belongs to {value!r}. Set {section}."
                                f"{key} = {value!r} to resume, or start a new run with --out NEW_DIR")


def check_same_data(path: Path, meta: dict, data_identity: dict[str, str]) -> None:
    """Raise TrainingError if the corpus or tokenizer differ from those the checkpoint trained on."""
    saved = meta.get("data", {})
    changed = [f"{what} (sha256 {saved[what][:16]} in the checkpoint, {data_identity[what][:16]} now)"
               for what in ("corpus", "tokenizer") if what in saved and saved[what] != data_identity.get(what)]
    if changed:
        raise TrainingError(f"cannot resume {path}: the {' and the '.join(changed)} changed since it was saved; "
                            f"token ids and the data stream would not continue the run. Restore the original "
                            f"[data] corpus / tokenizer, or start a new run with --out NEW_DIR")


def load_run(path: Path, tensors: dict, meta: dict, model, updater: Updater | None, cfg: TrainConfig,
             device: torch.device) -> TrainingProgress:
    """Load a checkpoint's tensors (already read by checkpoint.load_checkpoint) into model and updater.

    updater=None loads the weights alone (eval, generate, export need no optimizer state).
    Tensors stay on the CPU until their owner places them (see Updater.load_state_dict).
    """
    if meta["device_type"] != device.type and updater is not None:
        print(f"note: checkpoint was written on {meta['device_type']}, resuming on {device.type}: random "
              f"projections and SR draws differ between devices, so the run continues but not bit-exactly")
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) - tied_aliases(model) or unexpected:
        raise TrainingError(f"checkpoint {path} does not fit the recipe's model: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
    progress = TrainingProgress.from_state_dict(meta["progress"])
    if updater is None:
        return progress
    updater.load_state_dict(unflatten(meta["optim"], {k: v for k, v in tensors.items() if k.startswith("optim")}))
    return _resumed(progress, meta, cfg, device)


def load_sharded_run(path: Path, meta: dict, target, cfg: TrainConfig, device: torch.device) -> TrainingProgress:
    """Resume a sharded run from a sharded checkpoint, a collective: each rank reads only its blocks (the
    checkpoint may come from any world size: DCP reshards). An unsharded checkpoint goes through load_run.
    target: qtrain.parallel.fsdp.ShardedTraining (mesh, load_local_state)."""
    if not is_sharded(meta):
        raise TrainingError(f"checkpoint {path} is unsharded: load it with load_run")
    local = load_shards(path, meta, target.mesh)
    weights = {k[len("model/"):]: v for k, v in local.items() if k.startswith("model/")}
    if set(weights) != set(target.keys):
        raise TrainingError(f"checkpoint {path} does not fit the recipe's model: missing "
                            f"{sorted(set(target.keys) - set(weights))[:5]}, unexpected "
                            f"{sorted(set(weights) - set(target.keys))[:5]}")
    target.load_local_state(weights, unflatten(meta["optim"], {k: v for k, v in local.items()
                                                               if k.startswith("optim")}))
    return _resumed(TrainingProgress.from_state_dict(meta["progress"]), meta, cfg, device)


def _resumed(progress: TrainingProgress, meta: dict, cfg: TrainConfig, device: torch.device) -> TrainingProgress:
    """The RNG state of the checkpoint restored; what the recipe changed since, said."""
    _set_rng_state(progress.rng, device)
    for section in ("optim", "train"):
        for key, value in meta["recipe"][section].items():
            now = getattr(getattr(cfg, section), key)
            if _differs(now, value):
                print(f"note: [{section}] {key} changed on resume: {value!r} -> {now!r}")
    return progress
