"""What a run reports: metrics.jsonl (one JSON object per row), TensorBoard, the header, log lines, summary.

A resumed run first drops the rows that the interrupted run wrote after its last checkpoint, so the log
stays one series with each step once: metrics.jsonl is rewritten atomically, TensorBoard purges its
events past that step (SummaryWriter's purge_step).

Rows: every step writes {"step", "loss", "lr", "tokens", "grad_norm", "time"} (time: Unix seconds when the
host finished issuing the step); the last step of each log window adds "tok_s" and "step_s" (training
throughput and mean step time over the window, evaluation and checkpoints excluded) and "peak_mem_gib"
with "mem" ("cuda": torch's peak allocated bytes; "rss": the process's peak resident set on the CPU).
An evaluation writes {"step", "val_loss", "val_ppl", "sample"}; the end of a run {"step", "summary": {...}}.

The global gradient norm is measured on the device by the updater as its updates run (qtrain.update.grad_norm):
nothing is read on the host until log time.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qtrain.config.recipe import TrainConfig
from qtrain.core.atomic import write_atomic
from qtrain.data.protocols import RunData

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> int:
    """Rewrite path without the rows of steps after `step` (all rows for step 0); returns rows dropped.

    At step 0 nothing was checkpointed, so every row (the step-0 evaluation included) is redone.
    A torn last line (a kill mid-write) is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step > 0 and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(kept).encode())
    return dropped


class MetricsLog:
    """Appends rows to run_dir/metrics.jsonl and scalars to run_dir/tensorboard; start_step: the resumed step."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self.writer = None
        if not enabled:
            return
        truncate_after(self.path, start_step)
        self._file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is an optional extra
            self.writer = None

    def write(self, row: dict, scalars: dict[str, float] | None = None) -> None:
        """One JSON row (must hold "step"), and its scalars under their TensorBoard tags."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        if self.writer:
            for tag, value in (scalars or {}).items():
                self.writer.add_scalar(tag, value, row["step"])

    def flush(self) -> None:
        if self._file:
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self.writer:
            self.writer.close()


# --- watching a run -------------------------------------------------------------------------------------


def peak_memory(device) -> tuple[float, str]:
    """(GiB, kind): torch's peak allocated CUDA memory, or the process's peak RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "rss"  # Linux: KiB


class Clock:
    """Training time only: evaluations and checkpoints run inside `excluded()` and are not counted."""

    def __init__(self):
        self.start = time.perf_counter()
        self.window_start = self.start
        self.excluded_total = self.excluded_window = 0.0

    @contextlib.contextmanager
    def excluded(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.excluded_total += dt
            self.excluded_window += dt

    def window(self) -> float:
        """Training seconds since the last call (or the start); starts the next window."""
        now = time.perf_counter()
        seconds = now - self.window_start - self.excluded_window
        self.window_start, self.excluded_window = now, 0.0
        return max(seconds, 1e-9)

    def training_seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.excluded_total, 1e-9)

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.start


def plain_output() -> bool:
    """True when stdout is not a terminal (a file, a pipe, CI): log lines are printed instead of a bar."""
    return not sys.stdout.isatty()


def log_line(step: int, steps: int, loss: float, lr: float, tok_s: float, step_s: float, grad_norm: float,
             peak_gib: float, mem: str) -> str:
    """One plain line per log window (no carriage returns: fit for files and CI logs)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f"{stamp} step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
            f"{1000 * step_s:.1f} ms/step | grad norm {grad_norm:.3g} | peak {peak_gib:.2f} GiB "
            f"({'CUDA allocated' if mem == 'cuda' else 'RSS'})")


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cpu_threads(device) -> str:
    """", N CPU threads (...)" on a CPU device: torch takes one per physical core unless OMP_NUM_THREADS says
    otherwise, and on a machine shared with other work fewer threads can be several times faster."""
    if torch.device(device).type != "cpu":
        return ""
    n = torch.get_num_threads()
    return f", {n} CPU thread{'s' * (n != 1)}: set OMP_NUM_THREADS to change"


def header(cfg: TrainConfig, model: nn.Module, data: RunData, device: torch.device, dtype: torch.dtype, run_dir: Path,
           world_size: int, start_step: int) -> str:
    """The start-up summary: model size (int8 / float bytes), data, tokens per step and epochs, device."""
    from qtrain.data.tokenizer import boundary_note
    from qtrain.model.builder import int8_layers

    t = cfg.train
    layers = int8_layers(model)
    # from the layers' shapes: under FSDP2 (qtrain.parallel.fsdp) a rank holds only some rows, inside a `weight` parameter
    int8_params = sum(layer.out_features * layer.in_features for layer in layers.values())
    int8_bytes = sum(n + 2 * (n // layer.group_size) * layer.scale.element_size() for layer in layers.values()
                     for n in [layer.out_features * layer.in_features])
    quantized = {id(layer._parameters.get("weight")) for layer in layers.values()}
    floats = [p for p in model.parameters() if id(p) not in quantized]
    float_params = sum(p.numel() for p in floats)
    float_bytes = sum(p.numel() * p.element_size() for p in floats)
    tokens_per_step = world_size * t.batch_size * t.seq_len * t.grad_accum_steps
    lines = [f"run directory {run_dir}",
             f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size}: "
             f"{_count(int8_params + float_params)} parameters = {_count(int8_params)} int8 in {len(layers)} "
             f"projections ({_bytes(int8_bytes)} with group scales and offsets) + {_count(float_params)} float "
             f"({_bytes(float_bytes)}, {cfg.model.float_dtype})"]
    if cfg.model.init:
        lines.append(init_line(cfg))
    lines.append(data.describe())
    lines.append(f"tokens: {boundary_note(data.tokenizer)}")
    lines += data.notes  # how validation was formed, the detected record format
    resuming = f"; resuming at step {start_step}" if start_step else ""
    size, unit = data.epoch()
    if unit == "examples":  # fine-tuning: padded rows, one example each
        rows = world_size * t.batch_size * t.grad_accum_steps
        lines.append(f"steps: {t.steps:,} x {rows:,} examples per step ({world_size} x {t.batch_size} x "
                     f"{t.grad_accum_steps} accumulated) = {rows * t.steps:,} examples = "
                     f"{rows * t.steps / size:.2f} epochs of the training examples{resuming}")
    else:
        covered = tokens_per_step * t.steps
        epochs = f" = {covered / size:.2f} epochs of the training tokens" if size else ""
        lines.append(f"steps: {t.steps:,} x {tokens_per_step:,} tokens per step ({world_size} x {t.batch_size} x "
                     f"{t.seq_len} x {t.grad_accum_steps} accumulated) = {covered:,} tokens{epochs}{resuming}")
    lines.append(f"device: {device} ({str(dtype).removeprefix('torch.')} compute{cpu_threads(device)}), world size "
                 f"{world_size}, release {t.release}, optimizer {cfg.optim.method}")
    return "\n".join("qtrain: " + line for line in lines)


def init_line(cfg) -> str:
    """What [model] init's config.json set, and the recipe values it replaced."""
    m = cfg.model
    line = (f"init: {m.init}: its config.json sets the architecture: {m.family}, {m.num_layers} layers, hidden "
            f"{m.hidden_size}, intermediate {m.intermediate_size}, {m.num_heads} heads ({m.kv_heads} key/value, "
            f"head_dim {m.head_dim}), vocab {m.vocab_size}, max_seq_len {m.max_seq_len}, rope_theta {m.rope_theta:g}, "
            f"rms_norm_eps {m.rms_norm_eps:g}, {'tied' if m.tie_embeddings else 'untied'} embeddings")
    if cfg.init_replaced:
        def show(v) -> str:
            return str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)

        line += "; replaced the recipe's " + ", ".join(f"{k} = {show(a)} (now {show(b)})"
                                                      for k, (a, b) in cfg.init_replaced.items())
    return line


def summary(steps_done: int, tokens: int, clock: Clock) -> tuple[str, dict]:
    """The closing line and its metrics row: time, tokens, mean tokens/s over the training time."""
    train_s, wall_s = clock.training_seconds(), clock.wall_seconds()
    row = {"steps": steps_done, "tokens": tokens, "wall_s": round(wall_s, 3), "train_s": round(train_s, 3),
           "mean_tok_s": round(tokens / train_s, 1)}
    text = (f"done: {steps_done:,} steps in {wall_s:.1f} s ({train_s:.1f} s training, the rest evaluation and "
            f"checkpoints), {tokens:,} tokens, mean {tokens / train_s:,.0f} tokens/s")
    return text, row
