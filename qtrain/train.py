"""The training run: recipe -> model, updater, data -> steps -> checkpoints, from one function.

Chain (STYLE.md): TrainConfig -> build_model -> build_updater -> attach (release) -> fit -> save.
A step never syncs with the device except every log_every steps (loss logging, NaN check) and at
evaluation/checkpoint time.
"""

from __future__ import annotations

import base64
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qtrain.checkpoint import TrainingProgress, latest_checkpoint, load_checkpoint, save_checkpoint
from qtrain.config import TrainConfig
from qtrain.data import Dataset, prepare_data
from qtrain.model import build_model, enable_activation_checkpointing
from qtrain.optim.adam import Adam
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.optim.registry import build_method
from qtrain.release import Updater
from qtrain.schedule import lr_at
from qtrain.statetree import flatten, unflatten


class TrainingError(RuntimeError):
    """A run cannot start or cannot go on; the message says what to change."""


# ---- setup ------------------------------------------------------------------------------------------
def resolve_device(cfg: TrainConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError('[train] device = "cuda" but no CUDA GPU is visible to torch '
                            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); "
                            'set train.device = "cpu" (or "auto"), or install a CUDA build of torch (README)')
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.train.dtype]


def build_updater(model: torch.nn.Module, cfg: TrainConfig) -> Updater:
    o = cfg.optim
    method = build_method(o.method, o.args, weight_decay=o.weight_decay, seed=cfg.train.seed)
    lm_head = method if o.lm_head_optimizer == "same_as_matrices" else None
    embedding = method if o.embedding_optimizer == "same_as_matrices" else None
    floats = float_optimizer_factory(o.float_optimizer, tuple(o.float_betas), o.float_eps)
    # bf16 float tensors: "adamw" becomes qtrain's fp32-state Adam with SR on apply; "adam8bit" stays
    # bitsandbytes (8-bit state, nearest rounding to bf16: Adam's normalised steps, ~lr, are far above
    # the bf16 ulp of |w| ~ 0.02, ~1e-4, so rounding loses little; the leanest choice for 7B).
    bf16_adam = Adam(betas=tuple(o.float_betas), eps=o.float_eps) if o.float_optimizer == "adamw" else None
    return Updater(model, method, floats, lm_head_method=lm_head, embedding_method=embedding,
                   low_precision_adam=bf16_adam, seed=cfg.train.seed, rounding=cfg.quant.rounding,
                   float_grad_clip=o.float_grad_clip, kernels=cfg.quant.kernels)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; on CUDA through pinned memory so the copy is asynchronous (no host sync)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean next-token cross-entropy; logits upcast to fp32 for the softmax."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, data: Dataset, cfg: TrainConfig, device, dtype) -> float:
    """Mean validation loss over the same eval_batches windows every time (correct divisor n, not n + 1)."""
    model.eval()
    total, n = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in data.val_batches(cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len):
        total += lm_loss(model, x.to(device), y.to(device), dtype).double()
        n += 1
    model.train()
    divisor = n + 1 if cfg.train.legacy_eval_divisor else n  # legacy: the official code's n + 1 (spec §17.12)
    return total.item() / divisor


@torch.no_grad()
def generate_text(model, data: Dataset, prompt: str, max_new_tokens: int, device, seed: int = 0) -> str:
    """Top-k sampling from its own generator (the global RNG is left untouched)."""
    sp = data.tokenizer if isinstance(data, Dataset) else data
    ids = [sp.bos_id()] + sp.encode(prompt)
    x = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(input_ids=x[:, -limit:], use_cache=False).logits[0, -1].float()  # (V,)
        top = torch.topk(logits / 0.8, 40)
        nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
        if nxt.item() == sp.eos_id():
            break
        x = torch.cat([x, nxt[None]], dim=1)
    model.train()
    return sp.decode(x[0, 1:].tolist())


# ---- checkpoint contents ----------------------------------------------------------------------------
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
             device: torch.device) -> Path:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim_skeleton = flatten(updater.state_dict(), "optim", tensors)
    progress.rng = _rng_state(device)
    meta = {"progress": progress.state_dict(), "optim": optim_skeleton, "recipe": cfg.to_dict(),
            "device_type": device.type}
    return save_checkpoint(run_dir, progress.step, tensors, meta, cfg.train.keep_last)


SHAPE_SECTIONS = ("model", "quant")


def load_run(path: Path, model, updater: Updater, cfg: TrainConfig, device) -> TrainingProgress:
    tensors, meta = load_checkpoint(path)
    saved = meta["recipe"]
    for section in SHAPE_SECTIONS:
        for key, value in saved[section].items():
            now = getattr(getattr(cfg, section), key)
            if now != value and not (isinstance(now, tuple) and list(now) == value):
                raise TrainingError(f"cannot resume {path}: [{section}] {key} was {value!r} in the checkpoint "
                                    f"but is {now!r} now; the model shape must not change on resume. Restore it "
                                    f"or start a new run with --out NEW_DIR")
    if meta["device_type"] != device.type:
        print(f"note: checkpoint was written on {meta['device_type']}, resuming on {device.type}: random "
              f"projections and SR draws differ between devices, so the run continues but not bit-exactly")
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    optim_state = unflatten(meta["optim"], {k: v.to(device) for k, v in tensors.items() if k.startswith("optim")})
    updater.load_state_dict(optim_state)
    progress = TrainingProgress.from_state_dict(meta["progress"])
    _set_rng_state(progress.rng, device)
    for section in ("optim", "train"):
        for key, value in saved[section].items():
            now = getattr(getattr(cfg, section), key)
            if now != value and not (isinstance(now, tuple) and list(now) == value):
                print(f"note: [{section}] {key} changed on resume: {value!r} -> {now!r}")
    return progress


# ---- the loop ---------------------------------------------------------------------------------------
class _StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: stop at once (no save)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write("Ctrl-C: finishing this step and saving a checkpoint (press again to abort without saving)")

        self._old = signal.signal(signal.SIGINT, handler) if _main_thread() else None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class RunResult:
    run_dir: Path
    step: int
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    sample: str = ""
    interrupted: bool = False


def _log_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tensorboard"))
    except ImportError:  # tensorboard is optional
        return None


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, quiet: bool = False) -> RunResult:
    """Run (or resume) training as the recipe says; returns the evaluation history."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg)
    dtype = autocast_dtype(cfg, device)
    latest = latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is not None and not resume:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                            f"continue it, or --out NEW_DIR for a new run")
    if resume and latest is None:
        print(f"note: --resume given but {run_dir} has no checkpoint yet; starting from step 0")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(cfg.to_toml())

    data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, run_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    updater = build_updater(model, cfg)
    sampler = data.sampler(cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
    progress = TrainingProgress()
    if latest is not None:
        progress = load_run(latest, model, updater, cfg, device)
        sampler.load_state_dict(progress.sampler)
        print(f"resumed from {latest} at step {progress.step}")
    if cfg.train.release:
        updater.attach()
    predicted = None
    if device.type == "cuda":  # the estimate before the first step, the measurement after a few (fit)
        from qtrain.estimate import estimate

        try:
            predicted = estimate(cfg, "cuda")
            print(f"qtrain estimate: peak allocated {predicted.peak_allocated / 2**30:.2f} GiB, reserved "
                  f"{predicted.peak_reserved / 2**30:.2f} GiB (persistent {predicted.persistent_bytes / 2**30:.2f} GiB)")
        except Exception as e:  # the estimate is a report: never let it stop a run
            print(f"note: memory estimate unavailable ({type(e).__name__}: {e}); training continues")
        torch.cuda.reset_peak_memory_stats(device)
    return fit(cfg, run_dir, model, updater, data, sampler, progress, device, dtype, quiet, predicted)


MEASURE_AFTER_STEPS = 3  # steps after which the measured CUDA peak is printed beside the estimate


def memory_report(predicted, allocated: int, reserved: int) -> str:
    """One line: measured vs predicted peak allocated and reserved, with the error in percent."""
    def pct(measured: int, pred: int) -> str:
        return f"{100 * (pred - measured) / measured:+.1f} %"

    return (f"measured peak allocated {allocated / 2**30:.2f} GiB (estimate {predicted.peak_allocated / 2**30:.2f}, "
            f"{pct(allocated, predicted.peak_allocated)}), reserved {reserved / 2**30:.2f} GiB (estimate "
            f"{predicted.peak_reserved / 2**30:.2f}, {pct(reserved, predicted.peak_reserved)})")


def fit(cfg, run_dir, model, updater: Updater, data: Dataset, sampler, progress: TrainingProgress,
        device, dtype, quiet: bool, predicted=None) -> RunResult:
    t = cfg.train
    result = RunResult(run_dir, progress.step)
    writer = _log_writer(run_dir)
    metrics = open(run_dir / "metrics.jsonl", "a")
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps
    pending: list[tuple[int, torch.Tensor, float, int]] = []  # (step, loss on device, lr, tokens): synced at log time
    first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, kept on device
    last_saved = latest_checkpoint(run_dir)
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
            metrics.write(json.dumps({"step": step, "loss": loss, "lr": lr, "tokens": tokens}) + "\n")
            if writer:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
        metrics.flush()
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

    def save() -> None:
        nonlocal last_saved
        flush()  # never save after a non-finite loss
        progress.sampler = sampler.state_dict()
        last_saved = save_run(run_dir, model, updater, progress, cfg, device)

    def run_eval() -> None:
        loss = evaluate(model, data, cfg, device, dtype)
        result.eval_losses.append((progress.step, loss))
        sample = generate_text(model, data, "The", t.sample_tokens, device, seed=progress.step) if t.sample_tokens else ""
        result.sample = sample
        metrics.write(json.dumps({"step": progress.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                                  "sample": sample}) + "\n")
        if writer:
            writer.add_scalar("val/loss", loss, progress.step)
        tqdm.write(f"step {progress.step}: val loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})"
                   + (f" | {sample!r}" if sample else ""))

    try:
        with _StopRequest() as stop:
            if progress.step == 0:
                run_eval()
            while progress.step < t.steps:
                k = progress.step
                lr = lr_at(k, cfg.optim.lr, t.steps, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio)
                float_lr = lr_at(k, cfg.optim.float_lr_value, t.steps, cfg.optim.warmup_frac, cfg.optim.min_lr_ratio)
                updater.begin_step(lr, float_lr)
                step_loss = torch.zeros((), device=device)
                for _ in range(t.grad_accum_steps):
                    x, y = (to_device(t, device) for t in sampler.next_batch())
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
                    save()
                if stop.requested:
                    save()
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
        metrics.close()
        if writer:
            writer.close()
    result.step = progress.step
    return result
