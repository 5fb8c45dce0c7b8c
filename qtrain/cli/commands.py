"""What each `qtrain` verb does, given its parsed arguments: train, prepare, eval, generate, export, estimate, plot.

Commands that read a run (eval, generate, export) take everything from the run directory: its recipe.toml,
its tokenizer and its checkpoints. The corpus is never read: generate and export need only the run, and
eval reads the validation batches the run kept (eval_windows.npz), or for another --batches the validation
shards it trained on (recorded in its data.json). Only when those shards are gone does eval tokenize the
corpus again, with the run's own tokenizer, and says so when the corpus changed since training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from qtrain.checkpoint.run_dir import INIT_CONFIG_DIR, RECIPE_FILE
from qtrain.checkpoint.run_state import load_run
from qtrain.checkpoint.store import load_latest
from qtrain.config.recipe import LoopConfig, TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype, resolve_device
from qtrain.data.dataset import RUN_DATA_FILE, fingerprint_now, open_run_data, prepare_data
from qtrain.data.eval_windows import EVAL_WINDOWS_FILE, load_eval_windows
from qtrain.data.finetune import FinetuneData, finetune_kind, prepare_run_data
from qtrain.data.protocols import RunData
from qtrain.data.tokenizer import load_tokenizer, run_tokenizer_path
from qtrain.errors import ConfigError, DataError, ExportError, TrainingError
from qtrain.estimate.fit import fit_gpu, format_fit
from qtrain.estimate.memory import estimate
from qtrain.estimate.report import format_breakdown
from qtrain.hf.export import export_hf
from qtrain.model.builder import dequantized_copy
from qtrain.train.build import build
from qtrain.train.evaluation import evaluate
from qtrain.train.run import train
from qtrain.train.sampling import generate_text


def load_config(recipe: str | None, overrides: list[str]) -> TrainConfig:
    return TrainConfig.from_toml(find_recipe(recipe), overrides)


@dataclasses.dataclass
class TrainedRun:
    cfg: TrainConfig
    model: torch.nn.Module
    device: torch.device
    checkpoint: Path
    meta: dict
    tokenizer_path: Path


def load_trained(run: Path, device_name: str | None = None) -> TrainedRun:
    """The weights of a run's newest good checkpoint, built from the run's own recipe (no optimizer state)."""
    run = Path(run)
    recipe = run / RECIPE_FILE
    if not recipe.is_file():
        raise TrainingError(f"{run} is not a run directory (no {RECIPE_FILE}); pass the --out DIR of `qtrain train`")
    overrides = [f"train.device={device_name}"] if device_name else []
    copied = run / INIT_CONFIG_DIR
    if (copied / "config.json").is_file():  # a run from a HF checkpoint: its architecture, without the checkpoint
        overrides.append(f"model.init={json.dumps(str(copied))}")
    cfg = TrainConfig.from_toml(recipe, overrides)
    tokenizer_path = run_tokenizer_path(run)
    if tokenizer_path is None:
        raise TrainingError(f"{run} holds no tokenizer (tokenizer.model or tokenizer/): its token ids cannot be "
                            f"read; copy the tokenizer it was trained with into the run directory")
    device = resolve_device(cfg.train.device)
    found = load_latest(run)
    if found is None:
        raise TrainingError(f"{run} has no checkpoint yet; train it first (`qtrain train --out {run}`)")
    path, tensors, meta = found
    model = build(cfg, device, updater=False, weights=False).model  # the checkpoint fills every weight
    load_run(path, tensors, meta, model, None, cfg, device)
    model.eval()
    return TrainedRun(cfg, model, device, path, meta, tokenizer_path)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """`qtrain train`'s recipe: the file or shipped name, --set overrides, --fsdp."""
    return load_config(args.recipe, args.set + (["train.fsdp=true"] if args.fsdp else []))


def run_dir(args: argparse.Namespace) -> Path:
    """`qtrain train`'s run directory: --out, else runs/<recipe name>."""
    return Path(args.out) if args.out else Path("runs") / find_recipe(args.recipe).stem


def cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    out = run_dir(args)
    result = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if result.eval_losses:
        (s0, first), (s1, last) = result.eval_losses[0], result.eval_losses[-1]
        print(f"val loss {first:.4f} (step {s0}) -> {last:.4f} (step {s1}); run directory: {out}")
    if result.sample:
        print(f"sample: {result.sample}")
    return 130 if result.interrupted else 0


def cmd_eval(args: argparse.Namespace) -> int:
    r = load_trained(Path(args.run), args.device)
    cfg = r.cfg
    # the run's tokenizer, never one re-derived from the corpus: the token cache is keyed by it
    data_cfg = dataclasses.replace(cfg.data, tokenizer=str(r.tokenizer_path))
    if args.batches is not None:  # checked as train.eval_batches by the parser
        cfg.train.eval_batches = args.batches
        data_cfg = dataclasses.replace(data_cfg, eval_tokens=0)  # --batches wins over [data] eval_tokens
    trained_on = r.meta.get("data", {}).get("corpus")
    stored = load_eval_windows(Path(args.run))
    t = cfg.train
    if stored is not None and stored.covers(data_cfg.eval_tokens, t.eval_batches, t.batch_size, t.seq_len):
        data = stored  # the batches every evaluation of the run used, from the run directory alone
        now = fingerprint_now(cfg.data) if trained_on else None
        evaluated_on = f"the validation batches the run kept ({EVAL_WINDOWS_FILE}), as during training"
    else:
        data = open_run_data(Path(args.run), data_cfg, r.tokenizer_path)  # the shards it trained on: no corpus read
        if data is not None:
            now = fingerprint_now(cfg.data) if trained_on else None
            evaluated_on = "the validation shards the run trained with"
        else:
            try:  # plain text or fine-tuning records, with the run's own tokenizer
                data = prepare_run_data(dataclasses.replace(cfg, data=data_cfg), None)
            except DataError as e:
                kept = (f"its {EVAL_WINDOWS_FILE} holds the batches of another setting (--batches)" if stored is not None
                        else f"it keeps no {EVAL_WINDOWS_FILE} (a run from before they were kept)")
                raise DataError(f"{args.run} cannot be evaluated: {kept}, the validation shards listed in its "
                                f"{RUN_DATA_FILE} are gone, and its corpus cannot be read again: {e}") from None
            now = data.corpus_sha256
            evaluated_on = "the current corpus's validation split, tokenized with the run's own tokenizer"
    if args.batches is not None and data is not stored:  # the kept batches cover --batches (checked above)
        _check_eval_batches(data, args.batches, cfg.train)
    if trained_on and now and now != trained_on:
        print(f"note: [data] corpus {cfg.data.corpus!r} changed since this run trained on it (sha256 "
              f"{trained_on[:16]} then, {now[:16]} now): the loss below is on {evaluated_on}")
    loss = evaluate(r.model, data, cfg.train, r.device, autocast_dtype(cfg.train.dtype, r.device))
    print(f"{r.checkpoint.name}: val loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
          f"({cfg.train.eval_batches} batches of {cfg.train.batch_size} x {cfg.train.seq_len})")
    return 0


def _check_eval_batches(data: RunData, batches: int, t: LoopConfig) -> None:
    """--batches larger than the validation set holds is refused with the number it holds (evaluate would
    quietly use fewer windows than the line it prints claims)."""
    windows = data.val_window_count(t.seq_len)
    most = -(-windows // t.batch_size)
    if batches > most:
        raise ConfigError([f"--batches {batches}: the validation set holds {windows:,} windows of {t.seq_len} tokens "
                           f"= {most:,} batches of {t.batch_size}; use --batches 1 to {most:,}"],
                          source="the command line")


def cmd_prepare(args: argparse.Namespace) -> int:
    """`qtrain prepare RECIPE [--set k=v]`: tokenizer and token shards now, so `qtrain train` starts at once."""
    cfg = load_config(args.recipe, args.set)
    if args.workers is not None:  # checked as data.prepare_workers by the parser
        cfg.data.prepare_workers = args.workers
    if cfg.model.init or finetune_kind(cfg.data):  # the checkpoint's tokenizer; fine-tuning records
        data = prepare_run_data(cfg, None)
        if isinstance(data, FinetuneData):  # records are encoded in memory at each start: nothing to shard
            print(f"{data.kind} records: {len(data.train):,} training and {len(data.val):,} validation examples "
                  f"({data.truncated} cut to seq_len, {data.dropped} left out); tokenizer {data.tokenizer_path}")
            return 0
    else:
        data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, None, progress=not args.quiet)
    t = cfg.train
    per_step = t.batch_size * t.seq_len * t.grad_accum_steps
    for name, weight, stats in zip(data.names, data.weights, data.stats["train"]):
        held = ("(the tail of its token stream: too few documents to hold out whole ones)" if stats.get("val_tail")
                else f"in {stats['val_docs']:,}")
        print(f"{name} (weight {weight:g}): {stats['train_tokens']:,} training tokens in {stats['train_docs']:,} "
              f"documents, {stats['val_tokens']:,} validation tokens {held}")
    if cfg.data.validation:
        v = data.stats["val"][0]
        print(f"validation {cfg.data.validation}: {v['val_tokens']:,} tokens in {v['val_docs']:,} documents")
    print(f"shards: {', '.join(str(d) for d in data.shard_dirs)}")
    print(f"tokenizer: {data.tokenizer_path} ({data.tokenizer.get_piece_size()} pieces)")
    print(f"the recipe's {t.steps:,} steps x {per_step:,} tokens cover {t.steps * per_step / data.num_train_tokens:.2f} "
          f"epochs of the training tokens")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """`qtrain plot RUN [--out PNG]`: train/val loss, LR, tokens/s and gradient norm of a run, as a PNG."""
    from qtrain.cli.plot import plot_run

    out = plot_run(Path(args.run), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    r = load_trained(Path(args.run), args.device)
    tokenizer = load_tokenizer(r.tokenizer_path)
    print(generate_text(r.model, tokenizer, args.prompt, args.tokens, r.device, seed=args.seed))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    to = Path(args.to)
    if to.is_dir() and any(to.iterdir()) and not args.overwrite:  # before the checkpoint is read
        raise ExportError(f"--to {to} exists and is not empty; pass --overwrite to replace it, or choose a new "
                          f"directory")
    r = load_trained(Path(args.run), "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    plain = dequantized_copy(r.model, dtype)  # the one float copy: export_hf saves it as it is
    out = export_hf(plain, r.tokenizer_path, Path(args.to), dtype=dtype, overwrite=args.overwrite)
    print(f"exported {r.checkpoint.name} to {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """`qtrain estimate RECIPE [--set k=v] [--gpu-gib N] [--json]`."""
    cfg = load_config(args.recipe, args.set)
    fsdp = args.fsdp or cfg.train.fsdp
    b = estimate(cfg, "cpu" if cfg.train.device == "cpu" else "cuda", nproc=args.nproc, fsdp=fsdp)
    b.recipe = (str(find_recipe(args.recipe)) + "".join(f" --set {s}" for s in args.set)
                + (f" (per GPU of {args.nproc}, {'FSDP2' if fsdp else 'data parallel'})" if args.nproc > 1 else ""))
    fit = fit_gpu(cfg, args.gpu_gib, b) if args.gpu_gib is not None else None
    if args.json:
        out = b.to_dict()
        if fit is not None:
            out["fit"] = fit
        print(json.dumps(out, indent=2))
    else:
        print(format_breakdown(b))
        if fit is not None:
            print(format_fit(fit))
    return 0
