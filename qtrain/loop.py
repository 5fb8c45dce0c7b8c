"""The training loop: set the LR, run the micro-steps, finish the step, log, evaluate, save. Nothing else.

A step never syncs with the device except every log_every steps (loss logging, NaN check) and at
evaluation / checkpoint time. Setup (run directory, data, model, resume) is qtrain.train's business.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from qtrain.checkpoint import TrainingProgress
from qtrain.device import to_device
from qtrain.errors import TrainingError
from qtrain.evaluation import evaluate, lm_loss
from qtrain.metrics import MetricsLog
from qtrain.sampling import generate_text
from qtrain.schedule import lr_at
from qtrain.stop_request import StopRequest
from qtrain.updater import Updater

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
        predicted=None) -> RunResult:
    """Train from progress.step to cfg.train.steps; save(progress) writes a checkpoint and returns its path."""
    t = cfg.train
    result = RunResult(run_dir, progress.step)
    log = MetricsLog(run_dir, progress.step)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps
    pending: list[tuple[int, torch.Tensor, float, int]] = []  # (step, loss on device, lr, tokens): synced at log time
    first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, kept on device
    bar = tqdm(total=t.steps, initial=progress.step, disable=quiet, dynamic_ncols=True, unit="step")
    t0, tokens0 = time.perf_counter(), progress.tokens_seen
    start_step = progress.step

    def flush() -> None:  # one host sync for log_every steps of losses
        nonlocal t0, tokens0
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).tolist()
        bad = int(first_bad.item())
        elapsed = time.perf_counter() - t0
        tok_s = (progress.tokens_seen - tokens0) / max(elapsed, 1e-9)
        for (step, _, lr, tokens), loss in zip(pending, losses):
            log.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens}, {"train/loss": loss, "train/lr": lr})
        log.flush()
        post = {"loss": f"{losses[-1]:.3f}", "lr": f"{pending[-1][2]:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if device.type == "cuda":
            post["peak"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB"
        bar.set_postfix(post)
        pending.clear()
        t0, tokens0 = time.perf_counter(), progress.tokens_seen
        if bad >= 0:
            kept = f"the last good checkpoint is {last_saved.name}" if last_saved else "no checkpoint was written yet"
            raise TrainingError(f"loss became NaN/Inf at step {bad}; stopped without saving ({kept}). "
                                f"Lower [optim] lr or set [optim] float_grad_clip, then resume with --resume")

    def checkpoint() -> None:
        nonlocal last_saved
        flush()  # never save after a non-finite loss
        progress.sampler = sampler.state_dict()
        last_saved = save(progress)

    def run_eval() -> None:
        loss = evaluate(model, data, t, device, dtype)
        result.eval_losses.append((progress.step, loss))
        sample = (generate_text(model, data.tokenizer, "The", t.sample_tokens, device, seed=progress.step)
                  if t.sample_tokens else "")
        result.sample = sample
        log.write({"step": progress.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "sample": sample},
                  {"val/loss": loss})
        tqdm.write(f"step {progress.step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})"
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
                step_loss = torch.zeros((), device=device)
                for _ in range(t.grad_accum_steps):
                    x, y = (to_device(b, device) for b in sampler.next_batch())
                    loss = lm_loss(model, x, y, dtype)
                    (loss / t.grad_accum_steps).backward()  # release mode: every tensor is updated in here
                    step_loss += loss.detach() / t.grad_accum_steps
                updater.finish_step()
                progress.step += 1
                progress.tokens_seen += tokens_per_step
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), progress.step, first_bad)
                pending.append((progress.step, step_loss, lr, progress.tokens_seen))
                bar.update(1)
                if predicted is not None and progress.step == start_step + MEASURE_AFTER_STEPS:
                    tqdm.write(memory_report(predicted, torch.cuda.max_memory_allocated(device),
                                             torch.cuda.max_memory_reserved(device)))
                if progress.step % t.log_every == 0:
                    flush()
                if progress.step % t.eval_every == 0 or progress.step == t.steps:
                    flush()
                    run_eval()
                if (t.save_every and progress.step % t.save_every == 0) or progress.step == t.steps:
                    checkpoint()
                if stop.requested:
                    checkpoint()
                    result.interrupted = True
                    tqdm.write(f"saved {last_saved} at step {progress.step}; continue with --resume")
                    break
            flush()
    except torch.OutOfMemoryError as e:
        raise TrainingError(f"out of GPU memory at step {progress.step + 1}: {str(e).splitlines()[0]}. "
                            f"Run `qtrain estimate` with this recipe and --gpu-gib to see what fits "
                            f"(smaller train.batch_size or seq_len, train.activation_checkpointing = true)") from e
    finally:
        bar.close()
        log.close()
    result.step = progress.step
    return result
