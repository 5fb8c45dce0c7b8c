"""`qtrain` command line: train, eval, generate, export, estimate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RECIPE_DIRS = (Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "qtrain" / "recipes")
DEFAULT_RECIPE = "tiny"


def find_recipe(name: str | None) -> Path:
    """A path, or the name of a shipped recipe (tiny, 60m, ..., 7b)."""
    name = name or DEFAULT_RECIPE
    path = Path(name)
    if path.is_file():
        return path
    for d in RECIPE_DIRS:
        candidate = d / f"{name.removesuffix('.toml')}.toml"
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.toml"))
    raise SystemExit(f"qtrain: recipe {name!r} is neither a file nor a shipped recipe; shipped: {', '.join(shipped)}")


def load_config(recipe: str | None, overrides: list[str]):
    from qtrain.config import TrainConfig

    return TrainConfig.from_toml(find_recipe(recipe), overrides)


def _run_config(run: Path, overrides: list[str] = ()):
    from qtrain.config import TrainConfig

    recipe = Path(run) / "recipe.toml"
    if not recipe.is_file():
        raise SystemExit(f"qtrain: {run} is not a run directory (no recipe.toml); pass the --out DIR of `qtrain train`")
    return TrainConfig.from_toml(recipe, overrides)


def _load_trained(run: Path, device_name: str | None = None):
    """Model of the latest good checkpoint of a run, its config, dataset and device."""
    import torch

    from qtrain.checkpoint import latest_checkpoint
    from qtrain.data import prepare_data
    from qtrain.model import build_model
    from qtrain.train import build_updater, load_run, resolve_device

    overrides = [f"train.device={device_name}"] if device_name else []
    cfg = _run_config(run, overrides)
    device = resolve_device(cfg)
    path = latest_checkpoint(Path(run))
    if path is None:
        raise SystemExit(f"qtrain: {run} has no checkpoint yet; train it first (`qtrain train --out {run}`)")
    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, None)
    model = build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed)
    load_run(path, model, build_updater(model, cfg), cfg, device)
    torch.manual_seed(0)
    return cfg, model, data, device, path


def cmd_train(args) -> int:
    from qtrain.train import train

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
    import math

    from qtrain.train import autocast_dtype, evaluate

    cfg, model, data, device, path = _load_trained(Path(args.run), args.device)
    if args.batches:
        cfg.train.eval_batches = args.batches
    loss = evaluate(model, data, cfg, device, autocast_dtype(cfg, device))
    print(f"{path.name}: val loss {loss:.4f}, perplexity {math.exp(loss):.2f} "
          f"({cfg.train.eval_batches} batches of {cfg.train.batch_size} x {cfg.train.seq_len})")
    return 0


def cmd_generate(args) -> int:
    from qtrain.train import generate_text

    cfg, model, data, device, _ = _load_trained(Path(args.run), args.device)
    print(generate_text(model, data, args.prompt, args.tokens, device, seed=args.seed))
    return 0


def cmd_export(args) -> int:
    import torch

    from qtrain.export import export_hf
    from qtrain.model import dequantized_copy

    cfg, model, data, device, path = _load_trained(Path(args.run), "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    plain = dequantized_copy(model, torch.float32)
    out = export_hf(plain, data.tokenizer_path, Path(args.to), dtype=dtype, overwrite=args.overwrite)
    print(f"exported {path.name} to {out} ({args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_estimate(args) -> int:
    from qtrain.estimate import main as estimate_main

    return estimate_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtrain", description="Pretrain LLaMA models on one GPU: int8 weights with "
                                "stochastic rounding, APOLLO optimizers, layer-wise gradient release.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp):
        sp.add_argument("recipe", nargs="?", default=None,
                        help=f"recipe file or shipped name (tiny, 60m, 130m, 350m, 1b, 7b, 7b-8gb); default {DEFAULT_RECIPE}")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.steps=50 --set optim.args.rank=4 (repeatable)")

    t = sub.add_parser("train", help="pretrain from a recipe (no recipe: tiny model on the embedded corpus)")
    recipe_args(t)
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="validation loss and perplexity of a run's latest checkpoint")
    e.add_argument("run", help="run directory")
    e.add_argument("--batches", type=int, default=0, help="evaluation batches (default: the recipe's)")
    e.add_argument("--device", choices=["cpu", "cuda"], help="override [train] device")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a run's latest checkpoint")
    g.add_argument("run", help="run directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--tokens", type=int, default=64, help="new tokens to sample (default 64)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], help="override [train] device")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write a Hugging Face transformers model directory")
    x.add_argument("run", help="run directory")
    x.add_argument("--to", required=True, help="output directory")
    x.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --to directory")
    x.set_defaults(fn=cmd_export)

    s = sub.add_parser("estimate", help="predict peak GPU memory of a recipe before running it")
    recipe_args(s)
    s.add_argument("--gpu-gib", type=float, help="GPU memory to fit into; suggests changes when it does not fit")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_estimate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qtrain.config import ConfigError
    from qtrain.corpus import DataError
    from qtrain.checkpoint import CheckpointError
    from qtrain.export import ExportError
    from qtrain.train import TrainingError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, ExportError, TrainingError, ValueError) as e:
        print(f"qtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
