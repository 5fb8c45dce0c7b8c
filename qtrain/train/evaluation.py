"""The validation loss over fixed windows.

The value is defined per batch of train.batch_size windows (the mean loss of its targets, as lm_loss), then
averaged over the batches. It is computed in larger forwards: a window's losses do not depend on the other
windows of its batch (qtrain.model.loss.lm_loss_per_row), so the windows are run up to EVAL_LOGITS_BYTES of
fp32 logits at a time and the batch means rebuilt from per-window sums (the same value up to float summation
order), with each int8 projection dequantized once per evaluation (qtrain.quant.linear.dequantized_weights)
instead of once per forward.

Memory: evaluation runs between steps, when no gradient or saved activation is alive. Of the memory free
then, at most a quarter goes to logits (and as much to their log-softmax; under torch.distributed the
EVAL_LOGITS_BYTES cap alone, the same on every rank), and at most half of the rest to dequantized weights;
never fewer rows than train.batch_size, which a training step already fits.
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import nn
from tqdm import tqdm

from qtrain.config.recipe import LoopConfig
from qtrain.core.device import available_memory
from qtrain.data.protocols import RunData
from qtrain.model.loss import lm_loss_per_row
from qtrain.quant.linear import dequantized_weights

EVAL_LOGITS_BYTES = 2**29  # fp32 logits per forward at most (plus as much for the log-softmax)
PROGRESS_AFTER_S = 3.0  # a progress bar (on a terminal) for evaluations and samples longer than this


def inference_weights(model, dtype: torch.dtype, budget_bytes: int):
    """dequantized_weights for evaluation and sampling, in the dtype the projections compute in: the autocast
    dtype, or without autocast (fp32) the activations' (the float tensors')."""
    held = dtype if dtype != torch.float32 else model.get_input_embeddings().weight.dtype
    return dequantized_weights(model, held, budget_bytes)


def eval_rows(batch_size: int, seq_len: int, vocab_size: int, windows: int, logits_bytes: int = EVAL_LOGITS_BYTES) -> int:
    """Windows per forward: as many as logits_bytes of fp32 logits hold, at least batch_size (what training fits)."""
    return max(batch_size, min(windows, logits_bytes // (seq_len * vocab_size * 4)))


@torch.no_grad()
def evaluate(model: nn.Module, data: RunData, loop_cfg: LoopConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Mean validation loss over the same eval_batches windows every time (correct divisor n, not n + 1)."""
    batches = list(data.val_batches(loop_cfg.eval_batches, loop_cfg.batch_size, loop_cfg.seq_len))
    x = torch.cat([b[0] for b in batches])  # (N, T): every window, in order
    y = torch.cat([b[1] for b in batches])
    free = available_memory(device)
    # FSDP2 ranks all run these forwards (each all-gathers): their number must not depend on a rank's free memory
    cap = EVAL_LOGITS_BYTES if torch.distributed.is_initialized() else min(EVAL_LOGITS_BYTES, free // 4)
    rows = eval_rows(loop_cfg.batch_size, x.shape[1], model.config.vocab_size, len(x), cap)
    logits_bytes = 2 * rows * x.shape[1] * model.config.vocab_size * 4  # logits and log-softmax, fp32
    sums = torch.zeros(len(x), device=device, dtype=torch.float32)  # per window: summed loss and target count
    counts = torch.zeros(len(x), device=device, dtype=torch.int64)
    model.eval()
    try:
        with inference_weights(model, dtype, max(0, free - logits_bytes) // 2), \
                tqdm(total=len(x), desc="evaluating", unit="window", delay=PROGRESS_AFTER_S, leave=False,
                     disable=None) as bar:  # None: only on a terminal
            for i in range(0, len(x), rows):
                sums[i : i + rows], counts[i : i + rows] = lm_loss_per_row(
                    model, x[i : i + rows].to(device), y[i : i + rows].to(device), dtype)
                bar.update(min(rows, len(x) - i))
    finally:
        model.train()
    ends = torch.tensor([len(b[0]) for b in batches]).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    total = sum(sums[a:b].sum().double() / counts[a:b].sum() for a, b in zip(starts, ends))  # lm_loss of each batch
    n = len(batches)
    divisor = n + 1 if loop_cfg.legacy_eval_divisor else n  # legacy: the official code's n + 1 (algorithms.md §17)
    return float(total) / divisor
