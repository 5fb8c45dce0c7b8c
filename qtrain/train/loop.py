"""The training loop: set the LR, run the micro-steps, finish the step, log, evaluate, save. Nothing else.

A step never syncs with the device except every log_every steps (loss logging, NaN check) and at
evaluation / checkpoint time. Setup (run directory, data, model, resume) is qtrain.train.run's business.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from qtrain.checkpoint.store import TrainingProgress
from qtrain.config.recipe import TrainConfig
from qtrain.core.device import to_device
from qtrain.data.loader import BatchStream
from qtrain.data.protocols import RunData
from qtrain.errors import TrainingError
from qtrain.estimate.breakdown import Breakdown
from qtrain.parallel import distributed
from qtrain.parallel.distributed import World
from qtrain.train.dead_run import DeadRunDetector
from qtrain.train.evaluation import evaluate
from qtrain.train.metrics import Clock, MetricsLog, header, log_line, peak_memory, plain_output, summary
from qtrain.train.sampling import generate_text
from qtrain.train.schedule import lr_at, warmup_steps
from qtrain.train.stop_request import StopRequest
from qtrain.update.grad_norm import GradNorm
from qtrain.update.step import train_step
from qtrain.update.step_graph import CapturedStep
from qtrain.update.updater import Updater

MEASURE_AFTER_STEPS = 3  # steps after which the measured CUDA peak is printed beside the estimate


@dataclass
class RunResult:
    run_dir: Path
    step: int
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    sample: str = ""
    interrupted: bool = False


@dataclass(frozen=True)
class RunSetup:
    """What qtrain.train.run prepared for fit, fixed for the whole run.

    save(progress) writes a checkpoint and returns its path (None on the ranks that do not write);
    predicted: the memory estimate printed before the run (CUDA, rank 0), compared with the measured peak.
    """

    cfg: TrainConfig
    run_dir: Path
    model: torch.nn.Module
    updater: Updater
    data: RunData
    sampler: BatchStream
    device: torch.device
    dtype: torch.dtype
    save: Callable[[TrainingProgress], Path | None]
    quiet: bool = False
    predicted: Breakdown | None = None
    world: World = World()


@dataclass
class LoopState:
    """What the loop changes: the position (saved with every checkpoint), the newest checkpoint, the result."""

    progress: TrainingProgress
    last_saved: Path | None
    result: RunResult


class StepRecord(NamedTuple):
    """One step's log values; loss and grad_norm stay on the device until the window is flushed."""

    step: int
    loss: torch.Tensor
    lr: float
    tokens: int
    grad_norm: torch.Tensor
    time: float  # host time.time() when the step was queued


class Perf(NamedTuple):
    """A log window's speed and memory, reported on its last row."""

    tok_s: float
    step_s: float
    peak_gib: float
    mem: str


class Output:
    """Where the loop reports (rank 0 only): metrics.jsonl and TensorBoard, and a progress bar or plain lines."""

    def __init__(self, setup: RunSetup, start_step: int):
        self.steps = setup.cfg.train.steps
        self.main = setup.world.main
        self.log = MetricsLog(setup.run_dir, start_step, enabled=self.main)
        self.lines = not setup.quiet and plain_output()  # stdout is a file or a pipe: plain log lines, no bar
        self.bar = tqdm(total=self.steps, initial=start_step, disable=setup.quiet or self.lines, dynamic_ncols=True,
                        unit="step")

    def say(self, text: str) -> None:
        """A line above the bar; the other ranks print nothing."""
        if self.main:
            tqdm.write(text)

    def write_window(self, records: list[StepRecord], losses: list[float], norms: list[float], perf: Perf) -> None:
        """A log window's rows (its speed and memory on the last), then the bar's postfix or one plain line."""
        for i, (r, loss, norm) in enumerate(zip(records, losses, norms)):
            row = {"step": r.step, "loss": loss, "lr": r.lr, "tokens": r.tokens, "grad_norm": norm,
                   "time": round(r.time, 3)}
            scalars = {"train/loss": loss, "train/lr": r.lr, "train/grad_norm": norm}
            if i == len(records) - 1:
                row.update(tok_s=perf.tok_s, step_s=perf.step_s, peak_mem_gib=perf.peak_gib, mem=perf.mem)
                scalars.update({"perf/tokens_per_s": perf.tok_s, "perf/step_time_s": perf.step_s,
                                "perf/peak_mem_gib": perf.peak_gib})
            self.log.write(row, scalars)
        self.log.flush()
        last = records[-1]
        self.bar.set_postfix({"loss": f"{losses[-1]:.3f}", "lr": f"{last.lr:.2e}", "tok/s": f"{perf.tok_s:,.0f}",
                              "gnorm": f"{norms[-1]:.3g}", "peak": f"{perf.peak_gib:.2f}GiB"})
        if self.lines:
            self.say(log_line(last.step, self.steps, losses[-1], last.lr, perf.tok_s, perf.step_s, norms[-1],
                              perf.peak_gib, perf.mem))

    def close(self) -> None:
        self.bar.close()
        self.log.close()


class LogWindow:
    """The steps since the last log: their device values are synced once per window, then written and checked.

    clock: training time only (evaluations and saves excluded), the window's and the run's.
    """

    def __init__(self, setup: RunSetup, out: Output, clock: Clock, tokens_seen: int):
        cfg = setup.cfg
        self.setup, self.out, self.clock = setup, out, clock
        self.dead_run = DeadRunDetector(setup.model.config.vocab_size,
                                        warmup_steps(cfg.train.steps, cfg.optim.warmup_frac), cfg.optim.lr)
        self.records: list[StepRecord] = []
        self.tokens0 = tokens_seen  # tokens seen at the window's start: its tokens/s

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def restart(self, tokens_seen: int) -> None:
        """The next tokens/s counts only the steps from here on."""
        self.clock.window()
        self.tokens0 = tokens_seen

    def flush(self, state: LoopState) -> None:
        """One host sync (and one all-reduce) for the window's steps; raises on a non-finite loss or a dead run."""
        if not self.records:
            return
        records, self.records = self.records, []
        losses = distributed.sum_across_ranks(torch.stack([r.loss for r in records])).tolist()  # global means
        bad = next((r.step for r, loss in zip(records, losses) if not math.isfinite(loss)), -1)
        distributed.check_replicas(self.setup.model, self.setup.world, state.progress.step)
        norms = torch.stack([r.grad_norm for r in records]).tolist()
        elapsed = self.clock.window()  # training seconds since the last flush (evaluations and saves excluded)
        tok_s = (state.progress.tokens_seen - self.tokens0) / elapsed
        perf = Perf(tok_s, elapsed / len(records), *peak_memory(self.setup.device))
        self.out.write_window(records, losses, norms, perf)
        self.tokens0 = state.progress.tokens_seen
        if bad >= 0:
            saved = state.last_saved
            kept = f"the last good checkpoint is {saved.name}" if saved else "no checkpoint was written yet"
            raise TrainingError(f"loss became NaN/Inf at step {bad}; stopped without saving ({kept}). "
                                f"Lower [optim] lr or set [optim] float_grad_clip, then resume with --resume")
        self.dead_run.check([r.step for r in records], losses, norms)  # zero gradient, or loss flat at ln(vocab)


def memory_report(predicted: Breakdown, allocated: int, reserved: int) -> str:
    """One line: measured vs predicted peak allocated and reserved, with the error in percent."""
    def pct(measured: int, pred: int) -> str:
        return f"{100 * (pred - measured) / measured:+.1f} %"

    return (f"measured peak allocated {allocated / 2**30:.2f} GiB (estimate {predicted.peak_allocated / 2**30:.2f}, "
            f"{pct(allocated, predicted.peak_allocated)}), reserved {reserved / 2**30:.2f} GiB (estimate "
            f"{predicted.peak_reserved / 2**30:.2f}, {pct(reserved, predicted.peak_reserved)})")


def eager_step(setup: RunSetup) -> torch.Tensor:
    """One step of train_step: rank r takes micro-batches r*A .. r*A + A-1 of the step's W*A; the loss on device."""
    A, W, sampler, device = setup.cfg.train.grad_accum_steps, setup.world.size, setup.sampler, setup.device
    batches = ((to_device(x, device), to_device(y, device)) for x, y in
               (sampler.batch_at(sampler.batches_drawn + setup.world.rank * A + a) for a in range(A)))
    return train_step(setup.model, setup.updater, batches, setup.dtype, A * W)


def captured_step(setup: RunSetup, captured: CapturedStep) -> tuple[torch.Tensor, bool]:
    """One graph replay (after warm-up and capture); A == W == 1. The loss on device, and whether this step was
    the capture (speed is measured from there on)."""
    settling = captured.settling
    loss = captured(*(to_device(b, setup.device) for b in setup.sampler.batch_at(setup.sampler.batches_drawn)))
    capture = settling and not captured.settling
    if capture:
        torch.cuda.synchronize(setup.device)  # once: the warm-up and capture work ends here
    return loss, capture


def one_step(setup: RunSetup, state: LoopState, captured: CapturedStep | None, window: LogWindow,
             grad_norm: GradNorm) -> None:
    """Step progress.step + 1 at its LR: its tokens and micro-batches counted, its values queued for the log."""
    t, o, progress, sampler = setup.cfg.train, setup.cfg.optim, state.progress, setup.sampler
    micro = setup.world.size * t.grad_accum_steps  # the step's micro-batches over all ranks
    lr = lr_at(progress.step, o.lr, t.steps, o.warmup_frac, o.min_lr_ratio)
    float_lr = lr_at(progress.step, o.float_lr_value, t.steps, o.warmup_frac, o.min_lr_ratio)
    setup.updater.begin_step(lr, float_lr)
    loss, capture = captured_step(setup, captured) if captured is not None else (eager_step(setup), False)
    # real tokens of the step's W*A micro-batches (fine-tuning rows are padded: padding is not counted)
    progress.tokens_seen += sum(sampler.tokens_at(sampler.batches_drawn + j) for j in range(micro))
    if capture:
        window.restart(progress.tokens_seen)  # after this step's tokens: the window counts replayed steps only
    sampler.batches_drawn += micro
    progress.step += 1
    window.add(StepRecord(progress.step, loss, lr, progress.tokens_seen, grad_norm.take(), time.time()))


def evaluate_and_sample(setup: RunSetup, state: LoopState, out: Output, clock: Clock) -> None:
    """Validation loss and a text sample at progress.step: logged, printed and kept in the result (rank 0)."""
    t, world, step = setup.cfg.train, setup.world, state.progress.step
    if not world.main and not world.sharded:  # FSDP2: every rank runs the forward (its all-gathers)
        return
    with clock.excluded():
        loss = evaluate(setup.model, setup.data, t, setup.device, setup.dtype)
        sample = (generate_text(setup.model, setup.data.tokenizer, "The", t.sample_tokens, setup.device, seed=step)
                  if t.sample_tokens else "")
    if not world.main:
        return
    state.result.eval_losses.append((step, loss))
    state.result.sample = sample
    ppl = math.exp(min(loss, 50))
    out.log.write({"step": step, "val_loss": loss, "val_ppl": ppl, "sample": sample}, {"val/loss": loss})
    out.say(f"step {step}: val loss {loss:.4f} (ppl {ppl:.1f})" + (f" | {sample!r}" if sample else ""))


def checkpoint(setup: RunSetup, state: LoopState, window: LogWindow) -> None:
    """Save progress (and the sampler's position) after flushing the window: never after a non-finite loss."""
    window.flush(state)
    state.progress.sampler = setup.sampler.state_dict()
    if setup.world.main or setup.world.sharded:  # replicas: rank 0 writes its copy; shards: all gather, rank 0 writes
        with window.clock.excluded():
            state.last_saved = setup.save(state.progress)


def agree_on_stop(setup: RunSetup, stop: StopRequest) -> None:
    """A Ctrl-C reaches the ranks at different steps: at log time every rank stops if any one was asked to."""
    requested = torch.tensor([float(stop.requested)], device=setup.device)
    stop.requested = bool(distributed.sum_across_ranks(requested).item())


def after_step(setup: RunSetup, state: LoopState, window: LogWindow, stop: StopRequest) -> bool:
    """Log, evaluate and save when due; True when a stop request ended the run here (after saving)."""
    t, W, step = setup.cfg.train, setup.world.size, state.progress.step
    if step % t.log_every == 0:
        window.flush(state)
        if W > 1:
            agree_on_stop(setup, stop)
    if step % t.eval_every == 0 or step == t.steps:
        window.flush(state)
        evaluate_and_sample(setup, state, window.out, window.clock)
    if (t.save_every and step % t.save_every == 0) or step == t.steps:
        checkpoint(setup, state, window)
    if stop.requested and (W == 1 or step % t.log_every == 0):
        checkpoint(setup, state, window)
        state.result.interrupted = True
        window.out.say(f"saved {state.last_saved} at step {step}; continue with --resume")
        return True
    return False


def fit(setup: RunSetup, progress: TrainingProgress, last_saved: Path | None) -> RunResult:
    """Train from progress.step to cfg.train.steps; last_saved: the checkpoint progress was resumed from.

    With world.size > 1 this runs on every rank: each draws its own micro-batches of the global stream, and
    rank 0 alone logs, evaluates and saves (the other ranks' weights are identical, checked at log time).
    """
    cfg, world, device = setup.cfg, setup.world, setup.device
    state = LoopState(progress, last_saved, RunResult(setup.run_dir, progress.step))
    start_step, start_tokens = progress.step, progress.tokens_seen
    out = Output(setup, start_step)
    grad_norm = setup.updater.measure_grad_norm(across_ranks=world.sharded)  # FSDP2: shards' norms
    clock = Clock()
    window = LogWindow(setup, out, clock, progress.tokens_seen)
    captured = None
    if cfg.train.cuda_graph:  # config checked the rest
        captured = CapturedStep(setup.model, setup.updater, device, setup.dtype, world.size)
    # measured peak vs the estimate: after the capture when there is one (its graph pool included)
    measure_at = start_step + max(MEASURE_AFTER_STEPS, captured.steps_to_capture if captured is not None else 0)
    out.say(header(cfg, setup.model, setup.data, device, setup.dtype, setup.run_dir, world.size, start_step))
    try:
        with StopRequest() as stop:
            if progress.step == 0:
                evaluate_and_sample(setup, state, out, clock)
            while progress.step < cfg.train.steps:
                one_step(setup, state, captured, window, grad_norm)
                out.bar.update(1)
                if setup.predicted is not None and progress.step == measure_at:
                    out.say(memory_report(setup.predicted, torch.cuda.max_memory_allocated(device),
                                          torch.cuda.max_memory_reserved(device)))
                if after_step(setup, state, window, stop):
                    break
            window.flush(state)
        if progress.step > start_step:
            text, row = summary(progress.step - start_step, progress.tokens_seen - start_tokens, clock)
            out.log.write({"step": progress.step, "summary": row})
            out.say(text)
    except torch.OutOfMemoryError as e:
        raise TrainingError(f"out of GPU memory at step {progress.step + 1}: {str(e).splitlines()[0]}. "
                            f"Run `qtrain estimate` with this recipe and --gpu-gib to see what fits "
                            f"(smaller train.batch_size or seq_len, train.activation_checkpointing = true)") from e
    finally:
        out.close()
    state.result.step = progress.step
    return state.result
