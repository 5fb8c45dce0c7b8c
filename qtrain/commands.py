"""What each `qtrain` verb does, given its parsed arguments: train, eval, generate, export, estimate.

Commands that read a run (eval, generate, export) take everything from the run directory: its recipe.toml,
its tokenizer and its checkpoints. The corpus is never read to rebuild a tokenizer, so a moved or edited
corpus cannot silently change the token ids; eval reads the corpus only for its validation split, with
the run's own tokenizer, and says so when the corpus changed since training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from qtrain.build import build
from qtrain.checkpoint import load_latest
from qtrain.config import TrainConfig
from qtrain.data import prepare_data
from qtrain.device import autocast_dtype, resolve_device
from qtrain.errors import TrainingError
from qtrain.estimate import estimate, fit_gpu, format_breakdown, format_fit
from qtrain.evaluation import evaluate
from qtrain.export import export_hf
from qtrain.model import dequantized_copy
from qtrain.run_dir import RECIPE_FILE
from qtrain.run_state import load_run
from qtrain.sampling import generate_text
from qtrain.shipped_recipes import find_recipe
from qtrain.tokenizer import load_tokenizer, run_tokenizer_path
from qtrain.train import train


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
    cfg = TrainConfig.from_toml(recipe, [f"train.device={device_name}"] if device_name else [])
    tokenizer_path = run_tokenizer_path(run)
    if tokenizer_path is None:
        raise TrainingError(f"{run} holds no tokenizer (tokenizer.model or tokenizer/): its token ids cannot be "
                            f"read; copy the tokenizer it was trained with into the run directory")
    device = resolve_device(cfg.train.device)
    found = load_latest(run)
    if found is None:
        raise TrainingError(f"{run} has no checkpoint yet; train it first (`qtrain train --out {run}`)")
    path, tensors, meta = found
    model = build(cfg, device, updater=False).model
    load_run(path, tensors, meta, model, None, cfg, device)
    model.eval()
    return TrainedRun(cfg, model, device, path, meta, tokenizer_path)


def cmd_train(args) -> int:
    cfg = load_config(args.recipe, args.set)
    out = Path(args.out) if args.out else Path("runs") / find_recipe(args.recipe).stem
    result = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if result.eval_losses:
        (s0, first), (s1, last) = result.eval_losses[0], result.eval_losses[-1]
        print(f"val loss {first:.4f} (step {s0}) -> {last:.4f} (step {s1}); run directory: {out}")
    if result.sample:
        print(f"sample: {result.sample}")
    return 130 if result.interrupted else 0


def cmd_eval(args) -> int:
    r = load_trained(Path(args.run), args.device)
    cfg = r.cfg
    if args.batches:
        cfg.train.eval_batches = args.batches
    # the run's tokenizer, never one re-derived from the corpus: the token cache is keyed by it
    data_cfg = dataclasses.replace(cfg.data, tokenizer=str(r.tokenizer_path))
    data = prepare_data(data_cfg, cfg.model.vocab_size, cfg.train.seq_len, None)
    trained_on = r.meta.get("data", {}).get("corpus")
    if trained_on and trained_on != data.corpus_sha256:
        print(f"note: [data] corpus {cfg.data.corpus!r} changed since this run trained on it (sha256 "
              f"{trained_on[:16]} then, {data.corpus_sha256[:16]} now): the loss below is on the current "
              f"corpus's validation split, tokenized with the run's own tokenizer")
    loss = evaluate(r.model, data, cfg.train, r.device, autocast_dtype(cfg.train.dtype, r.device))
    print(f"{r.checkpoint.name}: val loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
          f"({cfg.train.eval_batches} batches of {cfg.train.batch_size} x {cfg.train.seq_len})")
    return 0


def cmd_generate(args) -> int:
    r = load_trained(Path(args.run), args.device)
    tokenizer = load_tokenizer(r.tokenizer_path)
    print(generate_text(r.model, tokenizer, args.prompt, args.tokens, r.device, seed=args.seed))
    return 0


def cmd_export(args) -> int:
    r = load_trained(Path(args.run), "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    plain = dequantized_copy(r.model, dtype)
    out = export_hf(plain, r.tokenizer_path, Path(args.to), dtype=dtype, overwrite=args.overwrite)
    print(f"exported {r.checkpoint.name} to {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_estimate(args) -> int:
    """`qtrain estimate RECIPE [--set k=v] [--gpu-gib N] [--json]`."""
    cfg = load_config(args.recipe, args.set)
    b = estimate(cfg, "cpu" if cfg.train.device == "cpu" else "cuda")
    b.recipe = str(find_recipe(args.recipe)) + "".join(f" --set {s}" for s in args.set)
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
