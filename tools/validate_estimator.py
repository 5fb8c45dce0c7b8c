"""Predicted (`qtrain.estimate.memory`) vs measured peak memory of one training step, per recipe and setting.

Every point builds the trainer's own pieces from the recipe with the point's overrides, in train.train's
order: build_model -> gradient_checkpointing_enable (non-reentrant, when set) -> build_updater -> attach
(release) -> steps of begin_step, lm_loss(...).backward(), finish_step, as fit() runs them. Batches are
uniform random token ids from a seeded generator (memory only, no corpus), created on the CPU and moved
to the device inside the step with train.to_device, as fit() does. One warm-up step creates the lazy
optimizer states; the peak is taken over the next step(s).
  CUDA (default): torch.cuda.reset_peak_memory_stats() after the warm-up step, then max_memory_allocated and
      max_memory_reserved (they count the persistent tensors, still allocated at the reset) against
      Breakdown.peak_allocated / peak_reserved. "context" is what the process holds beyond the allocator:
      torch.cuda.mem_get_info's used bytes minus memory_reserved (estimate.CUDA_CONTEXT_BYTES assumes 600 MiB).
      A 7B point runs only where the prediction fits the GPU.
  --cpu: compute dtype fp32 for dtype = "auto" (bf16 points set train.dtype = "bfloat16", CPU autocast);
      the peak is qtrain.core.memory_probe.cpu_peak_bytes of one step above the bytes held before it (the
      persistent tensors, summed from the tensors), against Breakdown.peak_allocated for device_type "cpu".
      One intra-op thread (the bytes do not depend on it; two threads only spin on a 2-core machine).
The table goes to stdout and, with --write-docs, into its section of docs/estimator.md (between markers).

    python tools/validate_estimator.py                      # CUDA: 60m, 350m, 1b, 7b points
    python tools/validate_estimator.py --cpu --write-docs   # CPU: tiny and 60m (vocabulary 2048) points
    python tools/validate_estimator.py --point 60m:1x256 --point 7b:1x256   # chosen points, recipes as shipped
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype, to_device
from qtrain.core.memory_probe import cpu_peak_bytes
from qtrain.estimate.memory import GiB, MiB, estimate
from qtrain.model.builder import build_model
from qtrain.model.loss import lm_loss
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release

DOCS = Path(__file__).resolve().parent.parent / "docs" / "estimator.md"
CKPT = "train.activation_checkpointing=true"
WIDE = ["model.hidden_size=256", "model.intermediate_size=688", "model.num_heads=4", "model.vocab_size=512",
        "quant.group_size=64"]
SMALL_VOCAB = ["model.vocab_size=2048"]

# (recipe, overrides): batch x sequence x checkpointing (x release, attention, dtypes on CPU)
CUDA_POINTS = [
    ("60m", ["train.batch_size=8", "train.seq_len=256"]),
    ("60m", ["train.batch_size=8", "train.seq_len=256", CKPT]),
    ("60m", ["train.batch_size=32", "train.seq_len=256"]),
    ("60m", ["train.batch_size=8", "train.seq_len=128", "train.release=false"]),
    ("350m", ["train.batch_size=4", "train.seq_len=256"]),
    ("350m", ["train.batch_size=4", "train.seq_len=256", CKPT]),
    ("350m", ["train.batch_size=16", "train.seq_len=256", CKPT]),
    ("1b", ["train.batch_size=1", "train.seq_len=256"]),
    ("1b", ["train.batch_size=4", "train.seq_len=256"]),
    ("1b", ["train.batch_size=4", "train.seq_len=256", CKPT]),
    ("7b", ["train.batch_size=1", "train.seq_len=256"]),
    ("7b", ["train.batch_size=2", "train.seq_len=256", CKPT]),
    ("7b-8gb", ["train.batch_size=1", "train.seq_len=256"]),
    ("7b-8gb", ["train.batch_size=1", "train.seq_len=128"]),
]
CPU_POINTS = [
    ("tiny", ["train.batch_size=2", "train.seq_len=32"]),
    ("tiny", ["train.batch_size=8", "train.seq_len=128"]),
    ("tiny", ["train.batch_size=8", "train.seq_len=128", CKPT]),
    ("tiny", WIDE + ["train.batch_size=2", "train.seq_len=64"]),
    ("tiny", WIDE + ["train.batch_size=4", "train.seq_len=64", "train.release=false"]),
    ("tiny", WIDE + ["train.batch_size=2", "train.seq_len=128", CKPT]),
    ("tiny", WIDE + ["train.batch_size=4", "train.seq_len=32", "train.dtype=bfloat16"]),
    ("tiny", WIDE + ["model.max_seq_len=512", "train.batch_size=2", "train.seq_len=512",
                     "model.attn_implementation=eager", CKPT]),
    ("tiny", ["train.batch_size=1", "train.seq_len=16", "model.vocab_size=8192", "train.dtype=bfloat16",
              "model.float_dtype=bfloat16", "optim.embedding_optimizer=same_as_matrices",
              "optim.lm_head_optimizer=same_as_matrices"]),
    ("60m", SMALL_VOCAB + ["train.batch_size=1", "train.seq_len=32"]),
    ("60m", SMALL_VOCAB + ["train.batch_size=2", "train.seq_len=64"]),
    ("60m", SMALL_VOCAB + ["train.batch_size=2", "train.seq_len=64", CKPT]),
    ("60m", SMALL_VOCAB + ["train.batch_size=2", "train.seq_len=64", "train.release=false"]),
]


@dataclass
class Row:
    recipe: str
    settings: str
    predicted: int
    measured: int
    predicted_reserved: int = 0
    measured_reserved: int = 0
    context: int = 0
    phase: str = ""
    skipped: str = ""


def trainer_step(cfg: TrainConfig, device: torch.device):
    """The trainer's pieces for cfg on device and one step as fit() runs it."""
    model = build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed)
    if cfg.train.activation_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' rename; train.py uses this name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    updater = build_updater(model, cfg)
    if cfg.train.release:
        attach_release(updater)
    dtype = autocast_dtype(cfg.train.dtype, device)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x, y = (torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), generator=gen)
            for _ in range(2))

    def step():
        updater.begin_step(1e-3)
        loss = lm_loss(model, to_device(x, device), to_device(y, device), dtype)
        loss.backward()
        updater.finish_step()

    return model, updater, step


def held_bytes(model, updater) -> int:
    """Persistent tensors after a step: parameters, buffers, method and float-optimizer states (distinct)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for s in updater.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors += [v for o in updater.float_opts.values() for s in o.state.values() for v in s.values()
                if isinstance(v, torch.Tensor)]
    seen: dict[int, int] = {id(t): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


def run_cpu(name: str, overrides: list[str]) -> Row:
    cfg = TrainConfig.from_toml(find_recipe(name), overrides)
    b = estimate(cfg, "cpu")
    model, updater, step = trainer_step(cfg, torch.device("cpu"))
    step()  # lazy states
    peak, _ = cpu_peak_bytes(step)
    return Row(name, _settings(overrides), b.peak_allocated, held_bytes(model, updater) + peak, phase=b.peak_phase)


def run_cuda(name: str, overrides: list[str]) -> Row:
    cfg = TrainConfig.from_toml(find_recipe(name), overrides)
    b = estimate(cfg, "cuda")
    free, total = torch.cuda.mem_get_info()
    row = Row(name, _settings(overrides), b.peak_allocated, 0, b.peak_reserved, 0, phase=b.peak_phase)
    if b.total_on_gpu > total:
        row.skipped = f"predicted {b.total_on_gpu / GiB:.1f} GiB > {total / GiB:.1f} GiB on this GPU"
        return row
    device = torch.device("cuda")
    model, updater, step = trainer_step(cfg, device)
    step()  # lazy states
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    step()
    torch.cuda.synchronize()
    row.measured = torch.cuda.max_memory_allocated()
    row.measured_reserved = torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info()
    row.context = (total - free) - torch.cuda.memory_reserved()
    del model, updater, step
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _err(predicted: int, measured: int) -> str:
    return f"{(predicted / measured - 1) * 100:+.2f} %" if measured else "n/a"


def _settings(overrides: list[str]) -> str:
    """The overrides as written in the table: WIDE and SMALL_VOCAB by name (a legend follows the table)."""
    rest = [o for o in overrides if o not in WIDE and o not in SMALL_VOCAB]
    named = ["WIDE"] * all(o in overrides for o in WIDE) + ["SMALL_VOCAB"] * all(o in overrides for o in SMALL_VOCAB)
    return " ".join(named + rest)


def table(rows: list[Row], cuda: bool) -> str:
    if cuda:
        lines = ["| recipe | settings | predicted alloc | max_memory_allocated | error | predicted reserved | "
                 "max_memory_reserved | error | context | peak phase |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.skipped:
                lines.append(f"| {r.recipe} | `{r.settings}` | {r.predicted / GiB:.2f} GiB | skipped: {r.skipped} "
                             f"| | | | | | |")
                continue
            lines.append(f"| {r.recipe} | `{r.settings}` | {r.predicted / GiB:.3f} GiB | {r.measured / GiB:.3f} GiB | "
                         f"{_err(r.predicted, r.measured)} | {r.predicted_reserved / GiB:.3f} GiB | "
                         f"{r.measured_reserved / GiB:.3f} GiB | {_err(r.predicted_reserved, r.measured_reserved)} | "
                         f"{r.context / MiB:.0f} MiB | {r.phase} |")
    else:
        lines = ["| recipe | settings | predicted peak | measured peak (cpu_peak_bytes + persistent) | error | "
                 "peak phase |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.recipe} | `{r.settings}` | {r.predicted / MiB:.2f} MiB | {r.measured / MiB:.2f} MiB | "
                         f"{_err(r.predicted, r.measured)} | {r.phase} |")
    return "\n".join(lines)


def write_docs(section: str, body: str) -> None:
    """Replace the text between <!-- {section}:start --> and <!-- {section}:end --> in docs/estimator.md."""
    text = DOCS.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOCS} has no {start} ... {end} markers; restore them")
    DOCS.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU validation points (no GPU needed)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/estimator.md")
    p.add_argument("--point", action="append", default=[], metavar="RECIPE:BxT",
                   help="run only this point (the recipe as shipped at batch B x sequence T), repeatable")
    args = p.parse_args(argv)
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("validate_estimator: no CUDA device visible to torch; run with --cpu for the CPU points")
    if not cuda:
        torch.set_num_threads(1)
    points = CUDA_POINTS if cuda else CPU_POINTS
    if args.point:
        points = [(name, [f"train.batch_size={bt.split('x')[0]}", f"train.seq_len={bt.split('x')[1]}"])
                  for name, bt in (pt.split(":") for pt in args.point)]
    env = (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB)"
           if cuda else f"CPU ({platform.processor() or platform.machine()}, 1 thread)")
    peak = "max over steps 2-3" if cuda else "step 2 (after one warm-up step creates the lazy states)"
    header = (f"Measured on {env}, torch {torch.__version__}, python {platform.python_version()}; command: "
              f"`python tools/validate_estimator.py{'' if cuda else ' --cpu'} --write-docs`. Settings are `--set` "
              f"overrides of the recipe; random token ids; peak of the trainer's own step: {peak}.")
    legend = (f"WIDE = `{' '.join(WIDE)}` (tiny made 4x wider with a small vocabulary, so that the block "
              f"backward sets the peak); SMALL_VOCAB = `{' '.join(SMALL_VOCAB)}` (a 32000-token 60M step is "
              f"~10x slower on CPU).")
    print(header, flush=True)
    rows = []
    for name, overrides in points:
        row = (run_cuda if cuda else run_cpu)(name, overrides)
        rows.append(row)
        print(f"  {name:7s} {row.settings:90s} predicted {row.predicted / MiB:10.2f} MiB  measured "
              f"{row.measured / MiB:10.2f} MiB  {_err(row.predicted, row.measured)}  {row.skipped}", flush=True)
    body = header + "\n\n" + table(rows, cuda) + "\n\n" + legend
    errors = [abs(r.predicted / r.measured - 1) for r in rows if r.measured]
    summary = f"{len(errors)} points; largest |error| {max(errors) * 100:.2f} %." if errors else "no point ran."
    body += "\n\n" + summary
    print("\n" + table(rows, cuda) + "\n\n" + summary)
    if args.write_docs:
        write_docs("gpu-table" if cuda else "cpu-table", body)
        print(f"wrote the {'GPU' if cuda else 'CPU'} table to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
