"""The training loop: set the LR, run the micro-steps, finish the step, log, evaluate, save. Nothing else.

A step never syncs with the device except every log_every steps (loss logging, NaN check) and at
evaluation / checkpoint time. Setup (run directory, data, model, resume) is qtrain.train.run's business.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from qtrain.checkpoint.store import TrainingProgress
from qtrain.core.device import to_device
from qtrain.errors import TrainingError
from qtrain.parallel import distributed
from qtrain.parallel.distributed import World
from qtrain.train.dead_run import DeadRunDetector
from qtrain.train.evaluation import evaluate
from qtrain.train.metrics import Clock, MetricsLog, header, log_line, peak_memory, plain_output, summary
from qtrain.train.sampling import generate_text
from qtrain.train.schedule import lr_at, warmup_steps
from qtrain.train.stop_request import StopRequest
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


def memory_report(predicted, allocated: int, reserved: int) -> str:
    """One line: measured vs predicted peak allocated and reserved, with the error in percent."""
    def pct(measured: int, pred: int) -> str:
        return f"{100 * (pred - measured) / measured:+.1f} %"

    return (f"measured peak allocated {allocated / 2**30:.2f} GiB (estimate {predicted.peak_allocated / 2**30:.2f}, "
            f"{pct(allocated, predicted.peak_allocated)}), reserved {reserved / 2**30:.2f} GiB (estimate "
            f"{predicted.peak_reserved / 2**30:.2f}, {pct(reserved, predicted.peak_reserved)})")


def fit(cfg, run_dir: Path, model, updater: Updater, data, sampler, progress: TrainingProgress, device,
        dtype, save: Callable[[TrainingProgress], Path], last_saved: Path | None, quiet: bool,
        predicted=None, world: World = World()) -> RunResult:
    """Train from progress.step to cfg.train.steps; save(progress) writes a checkpoint and returns its path.

    With world.size > 1 this runs on every rank: each draws its own micro-batches of the global stream, and
    rank 0 alone logs, evaluates and saves (the other ranks' weights are identical, checked at log time).
    """
    t = cfg.train
    W, A = world.size, t.grad_accum_steps
    result = RunResult(run_dir, progress.step)
    log = MetricsLog(run_dir, progress.step, enabled=world.main)
    # (step, loss on device, lr, tokens, grad norm on device, host time): synced at log time
    pending: list[tuple[int, torch.Tensor, float, int, torch.Tensor, float]] = []
    lines = not quiet and plain_output()  # stdout is a file or a pipe: plain log lines, no progress bar
    bar = tqdm(total=t.steps, initial=progress.step, disable=quiet or lines, dynamic_ncols=True, unit="step")
    say = tqdm.write if world.main else (lambda text: None)
    tokens0 = start_tokens = progress.tokens_seen
    start_step = progress.step
    grad_norm = updater.measure_grad_norm(across_ranks=world.sharded)  # FSDP2: shards' norms
    clock = Clock()
    dead_run = DeadRunDetector(model.config.vocab_size, warmup_steps(t.steps, cfg.optim.warmup_frac), cfg.optim.lr)
    captured = CapturedStep(model, updater, device, dtype, W) if t.cuda_graph else None  # config checked the rest
    # measured peak vs the estimate: after the capture when there is one (its graph pool included)
    measure_at = start_step + max(MEASURE_AFTER_STEPS, captured.steps_to_capture if captured is not None else 0)
    say(header(cfg, model, data, device, dtype, run_dir, W, start_step))

    def flush() -> None:  # one host sync (and one all-reduce) for log_every steps of losses
        nonlocal tokens0
        if not pending:
            return
        losses = distributed.sum_across_ranks(torch.stack([p[1] for p in pending])).tolist()  # global means
        bad = next((step for (step, *_), loss in zip(pending, losses) if not math.isfinite(loss)), -1)
        distributed.check_replicas(model, world, progress.step)
        norms = torch.stack([p[4] for p in pending]).tolist()
        elapsed = clock.window()  # training seconds since the last flush (evaluations and saves excluded)
        tok_s = (progress.tokens_seen - tokens0) / elapsed
        step_s = elapsed / len(pending)
        peak, mem = peak_memory(device)
        for i, ((step, _, lr, tokens, _, stamp), loss, norm) in enumerate(zip(pending, losses, norms)):
            row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "grad_norm": norm, "time": round(stamp, 3)}
            scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}
            if i == len(pending) - 1:
                row.update(tok_s=tok_s, step_s=step_s, peak_mem_gib=peak, mem=mem)
                scalars.update({"perf/tokens_per_s": tok_s, "perf/step_time_s": step_s, "perf/peak_mem_gib": peak})
            log.write(row, scalars)
        log.flush()
        post = {"loss": f"{losses[-1]:.3f}", "lr": f"{pending[-1][2]:.2e}", "tok/s": f"{tok_s:,.0f}",
                "gnorm": f"{norms[-1]:.3g}", "peak": f"{peak:.2f}GiB"}
        bar.set_postfix(post)
        if lines:
            say(log_line(progress.step, t.steps, losses[-1], pending[-1][2], tok_s, step_s, norms[-1], peak, mem))
        steps = [p[0] for p in pending]
        pending.clear()
        tokens0 = progress.tokens_seen
        if bad >= 0:
            kept = f"the last good checkpoint is {last_saved.name}" if last_saved else "no checkpoint was written yet"
            raise TrainingError(f"loss became NaN/Inf at step {bad}; stopped without saving ({kept}). "
                                f"Lower [optim] lr or set [optim] float_grad_clip, then resume with --resume")
        dead_run.check(steps, losses, norms)  # raises on a dead run (zero gradient, or loss flat at ln(vocab))

    def restart_window() -> None:  # the next tokens/s counts only the steps from here on
        nonlocal tokens0
        clock.window()
        tokens0 = progress.tokens_seen

    def checkpoint() -> None:
        nonlocal last_saved
        flush()  # never save after a non-finite loss
        progress.sampler = sampler.state_dict()
        if world.main or world.sharded:  # replicas: rank 0 writes its copy; shards: all gather, rank 0 writes
            with clock.excluded():
                last_saved = save(progress)

    def run_eval() -> None:
        if not world.main and not world.sharded:  # FSDP2: every rank runs the forward (its all-gathers)
            return
        with clock.excluded():
            loss = evaluate(model, data, t, device, dtype)
            sample = (generate_text(model, data.tokenizer, "The", t.sample_tokens, device, seed=progress.step)
                      if t.sample_tokens else "")
        if not world.main:
            return
        result.eval_losses.append((progress.step, loss))
        result.sample = sample
        log.write({"step": progress.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "sample": sample},
                  {"val/loss": loss})
        say(f"step {progress.step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})"
                   + (f" | {sample!r}" if sample else ""))

    try:
        with StopRequest() as stop:
            if progress.step == 0:
                run_eval()
            while progress.step < t.steps:
                k = progress.step
                lr = lr_at(k, cfg.optim.lr, t.steps, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio)
                float_lr = lr_at(k, cfg.optim.float_lr_value, t.steps, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio)
                updater.begin_step(lr, float_lr)
                if captured is not None:  # one graph replay (after warm-up and capture); A == W == 1
                    settling = captured.settling
                    step_loss = captured(*(to_device(b, device) for b in sampler.batch_at(sampler.batches_drawn)))
                    if settling and not captured.settling:  # the capture step: speed is measured from here on
                        torch.cuda.synchronize(device)  # once: the warm-up and capture work ends here
                else:  # rank r takes micro-batches r*A .. r*A + A-1 of the step's W*A
                    batches = ((to_device(x, device), to_device(y, device)) for x, y in
                               (sampler.batch_at(sampler.batches_drawn + world.rank * A + a) for a in range(A)))
                    step_loss = train_step(model, updater, batches, dtype, A * W)
                # real tokens of the step's W*A micro-batches (fine-tuning rows are padded: padding is not counted)
                progress.tokens_seen += sum(sampler.tokens_at(sampler.batches_drawn + j) for j in range(W * A))
                if captured is not None and settling and not captured.settling:
                    restart_window()  # after this step's tokens: the window counts replayed steps only
                sampler.batches_drawn += W * A
                progress.step += 1
                pending.append((progress.step, step_loss, lr, progress.tokens_seen, grad_norm.take(), time.time()))
                bar.update(1)
                if predicted is not None and progress.step == measure_at:
                    say(memory_report(predicted, torch.cuda.max_memory_allocated(device),
                                             torch.cuda.max_memory_reserved(device)))
                if progress.step % t.log_every == 0:
                    flush()
                    if W > 1:  # a Ctrl-C reaches the ranks at different steps: they agree at log time
                        stop.requested = bool(distributed.sum_across_ranks(
                            torch.tensor([float(stop.requested)], device=device)).item())
                if progress.step % t.eval_every == 0 or progress.step == t.steps:
                    flush()
                    run_eval()
                if (t.save_every and progress.step % t.save_every == 0) or progress.step == t.steps:
                    checkpoint()
                if stop.requested and (W == 1 or progress.step % t.log_every == 0):
                    checkpoint()
                    result.interrupted = True
                    say(f"saved {last_saved} at step {progress.step}; continue with --resume")
                    break
            flush()
        if progress.step > start_step:
            text, row = summary(progress.step - start_step, progress.tokens_seen - start_tokens, clock)
            log.write({"step": progress.step, "summary": row})
            say(text)
    except torch.OutOfMemoryError as e:
        raise TrainingError(f"out of GPU memory at step {progress.step + 1}: {str(e).splitlines()[0]}. "
                            f"Run `qtrain estimate` with this recipe and --gpu-gib to see what fits "
                            f"(smaller train.batch_size or seq_len, train.activation_checkpointing = true)") from e
    finally:
        bar.close()
        log.close()
    result.step = progress.step
    return result
