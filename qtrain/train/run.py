"""`qtrain train`: a recipe and a run directory -> data, model, updater, resumed state -> the loop.

The setup order matters: the run directory is locked before anything is written into it; a resume is
checked against the recipe before any state is loaded, and against the corpus (a stat of its files) before
anything is tokenized; the checkpoint's data identity is checked again once the data is prepared, and only
then are recipe.toml, the tokenizer, data.json and the evaluation batches (re)written, so a refused resume
leaves the run directory as it was; under torchrun the ranks agree on the recipe before anything else, and
on the initial weights before the first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from qtrain.checkpoint.run_dir import RunDir
from qtrain.checkpoint.run_state import check_resumable, check_same_data, load_run, load_sharded_run, save_run
from qtrain.checkpoint.store import TrainingProgress, checkpoint_dirs, load_latest
from qtrain.config import rules
from qtrain.config.recipe import TrainConfig
from qtrain.core.device import autocast_dtype, resolve_device
from qtrain.data.eval_windows import save_eval_windows
from qtrain.data.finetune import corpus_identity_now, prepare_run_data
from qtrain.data.protocols import RunData
from qtrain.errors import TrainingError
from qtrain.estimate.breakdown import Breakdown
from qtrain.estimate.memory import estimate
from qtrain.hf.pretrained import checkpoint_problems, checkpoint_tokenizer
from qtrain.parallel import distributed
from qtrain.parallel.distributed import World
from qtrain.parallel.fsdp import ShardedTraining, StateView
from qtrain.train.build import build
from qtrain.train.loop import RunResult, RunSetup, fit
from qtrain.update.release import attach_release

# load_latest's answer: a checkpoint, its tensors (None when sharded: each rank reads its blocks later), its meta
Found = tuple[Path, dict[str, torch.Tensor] | None, dict]


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> RunResult:
    """Run (or resume) training as the recipe says; returns the evaluation history.

    Under torchrun (WORLD_SIZE > 1) every rank runs this function: data parallel with replicated int8
    weights (qtrain.parallel.distributed), or with [train] fsdp each rank holding a shard of them (qtrain.parallel.fsdp);
    rank 0 alone prints, logs and writes into run_dir.
    """
    run_dir = Path(run_dir)
    _check_init(cfg)
    world = distributed.launched_world()
    if cfg.train.fsdp and world.size > 1:
        world = dataclasses.replace(world, sharded=True)
    elif cfg.train.fsdp and not quiet:
        print("note: [train] fsdp = true in one process: nothing to shard; training as usual "
              "(launch with --nproc N to shard across N processes)")
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dtype = autocast_dtype(cfg.train.dtype, device)
    rules.check_launch(cfg, world.size, device.type)  # before the data is prepared or anything is built
    distributed.init(world, device)
    resume_hint = f"The newest checkpoint in {run_dir} is complete: fix the failed rank (see its log) and relaunch " \
                  f"with --resume"
    try:
        distributed.check_same_recipe(world, cfg.to_toml())
        with RunDir(run_dir) if world.main else contextlib.nullcontext() as run, \
                distributed.sigterm_as_error(world, resume_hint):
            result = _train(cfg, run_dir, run, world, device, dtype, resume, quiet)
        if world.sharded:
            distributed.release_sharded_state()
        return result
    except RuntimeError as e:
        if world.size > 1 and distributed.is_peer_failure(e):
            raise TrainingError(f"rank {world.rank}: a collective with the other ranks failed ({str(e).splitlines()[0]}"
                                f"); a peer rank died or hung. {resume_hint}") from e
        raise
    finally:
        distributed.shutdown()


def _check_init(cfg: TrainConfig) -> None:
    """[model] init's files, checked before the run directory or the model exists (a recipe may name a checkpoint
    that is not there yet: `qtrain estimate` sizes it from the recipe's keys)."""
    if not cfg.model.init:
        return
    problems = checkpoint_problems(cfg.model.init)
    if not problems and not cfg.data.tokenizer:
        try:
            checkpoint_tokenizer(cfg.model.init)
        except TrainingError as e:
            problems.append(str(e))
    if problems:
        raise TrainingError("\n".join(problems))


def _find_resume(cfg: TrainConfig, run_dir: Path, world: World, resume: bool) -> Found | None:
    """The newest checkpoint this recipe can continue (None: start at step 0), checked against the corpus on disk
    before anything is tokenized. FSDP2: each rank reads its own blocks later (the tensors are None here)."""
    existing = checkpoint_dirs(run_dir)
    if existing and not resume:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {existing[0].name}); pass --resume to "
                            f"continue it, or --out NEW_DIR for a new run")
    found = load_latest(run_dir, accept=lambda path, meta: check_resumable(path, meta, cfg),
                        read_shards=not world.sharded) if resume else None
    if resume and found is None and world.main:
        print(f"note: --resume given but {run_dir} has no checkpoint yet; starting from step 0")
    if found is not None and world.main and (now := corpus_identity_now(cfg)) is not None:
        # a changed corpus, from a stat of its files: refused before anything is tokenized
        check_same_data(found[0], found[2], {**found[2].get("data", {}), "corpus": now})
    return found


def _open_data(cfg: TrainConfig, run_dir: Path, run: RunDir, world: World, found: Found | None) -> RunData:
    """The run's data (rank 0 prepares the caches, the others open them), checked against a resumed checkpoint,
    then recorded in the run directory: only now, so a refused resume leaves the directory as it was."""
    if world.main:
        data = prepare_run_data(cfg, None)  # plain text (qtrain.data.dataset) or prompt/completion / chat records
    distributed.barrier()  # rank 0 built the caches; the others open them
    if not world.main:
        data = prepare_run_data(cfg, None)
    if found is not None:
        check_same_data(found[0], found[2], data.identity())
    if world.main:
        run.write_recipe(cfg.to_toml())
        if cfg.model.init:  # the architecture, so eval / generate / export work without the init directory
            run.write_init_config(Path(cfg.model.init).expanduser() / "config.json")
        data.record(run_dir)  # its tokenizer and data.json
        t = cfg.train  # the batches every evaluation uses: `qtrain eval` needs neither the corpus nor the cache
        save_eval_windows(data, run_dir, t.eval_batches, t.batch_size, t.seq_len, cfg.data.eval_tokens)
    return data


def _train(cfg: TrainConfig, run_dir: Path, run: RunDir, world: World, device: torch.device, dtype: torch.dtype,
           resume: bool, quiet: bool) -> RunResult:
    found = _find_resume(cfg, run_dir, world, resume)
    data = _open_data(cfg, run_dir, run, world, found)
    torch.manual_seed(cfg.train.seed)
    fresh = found is None
    shards_pending = not fresh and found[1] is None  # a sharded checkpoint, read once the model is sharded
    # FSDP2: built on the meta device, each rank materialises only its shards (random init, its rows of a
    # [model] init checkpoint, or a sharded run checkpoint); to resume an unsharded checkpoint the whole model is
    # built in host memory first and fully_shard keeps (on CUDA: moves to the GPU) each rank's shards
    per_rank = world.sharded and (shards_pending or fresh)
    build_device = torch.device("meta") if per_rank else torch.device("cpu") if world.sharded else device
    built = build(cfg, build_device, updater=not world.sharded, weights=fresh)  # resumed: the checkpoint's
    model, updater = built.model, built.updater
    sampler = data.sampler(cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    progress, last_saved = TrainingProgress(), None
    full_updater_state = StateView({})  # FSDP2: the checkpoint's unsharded Updater state, sliced after sharding
    if found is not None and not shards_pending:
        last_saved, tensors, meta = found
        progress = load_run(last_saved, tensors, meta, model, full_updater_state if world.sharded else updater,
                            cfg, device)
        del tensors, found  # the CPU copy of the checkpoint is not needed past this point
    reducer, sharded = None, None
    if world.sharded:
        if not per_rank:  # same seed, same init (or checkpoint): verified before the weights are cut
            distributed.check_replicas(model, dataclasses.replace(world, sharded=False), progress.step)
        # its hooks update every shard inside backward; per_rank: it materialises the shards (init=False: the
        # checkpoint's), each rank's rows of the same weights whatever the world size
        sharded = ShardedTraining(model, cfg, world, device, init=fresh)
        if shards_pending:
            last_saved, _, meta = found
            progress = load_sharded_run(last_saved, meta, sharded, cfg, device)
            found = None
        elif full_updater_state.sd:  # resumed from an unsharded checkpoint
            sharded.load_full_updater_state(full_updater_state.sd)
        model, updater = sharded.model, sharded.updater
        built = full_updater_state = None  # the unsharded model's Updater and state: not needed past this point
    elif world.size > 1:
        distributed.check_replicas(model, world, progress.step)  # same seed, same init: verified, not assumed
        if cfg.train.release and cfg.train.dp_overlap > 0:
            reducer = distributed.OverlappedReducer(cfg.train.dp_overlap)  # reduces before the Updater's hooks
        else:
            updater.add_grad_hook(distributed.reduce_grad_)  # first: later hooks see the global gradient
    if last_saved is not None:
        sampler.load_state_dict(progress.sampler)
        if world.main:
            print(f"resumed from {last_saved} at step {progress.step}")
    if cfg.train.release and sharded is None:
        attach_release(updater, reducer)
    predicted = _cuda_estimate(cfg, device, world.size, world.sharded) if world.main else None

    def save(p: TrainingProgress) -> Path | None:
        if sharded is None:
            return save_run(run_dir, model, updater, p, cfg, device, data.identity())
        model_sd, updater_sd = sharded.sharded_state()  # DTensors over each rank's blocks: every rank writes its own
        return save_run(run_dir, StateView(model_sd), StateView(updater_sd), p, cfg, device, data.identity(),
                        sharded=True)

    setup = RunSetup(cfg, run_dir, model, updater, data, sampler, device, dtype, save, quiet or not world.main,
                     predicted, world)
    return fit(setup, progress, last_saved)


def _cuda_estimate(cfg: TrainConfig, device: torch.device, nproc: int = 1, fsdp: bool = False) -> Breakdown | None:
    """The memory estimate printed before the first step on CUDA (fit prints the measurement after a few)."""
    if device.type != "cuda":
        return None
    predicted = None
    try:
        predicted = estimate(cfg, "cuda", nproc=nproc, fsdp=fsdp)
        print(f"qtrain estimate: peak allocated {predicted.peak_allocated / 2**30:.2f} GiB, reserved "
              f"{predicted.peak_reserved / 2**30:.2f} GiB (persistent {predicted.persistent_bytes / 2**30:.2f} GiB)")
    except Exception as e:  # the estimate is a report: never let it stop a run
        print(f"note: memory estimate unavailable ({type(e).__name__}: {e}); training continues")
    torch.cuda.reset_peak_memory_stats(device)
    return predicted
