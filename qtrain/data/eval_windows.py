"""The validation batches a run evaluates on, kept in its run directory: `qtrain eval` needs no corpus and no cache.

A run's evaluations all use the same fixed batches (Dataset.val_batches: windows spread over the validation
tokens; FinetuneData.val_batches: the first validation examples). They are small (eval_tokens ids), so
`qtrain train` writes them once into RUN/eval_windows.npz: x and y, (N, T) int32 each (y holds -100 where no
loss is wanted), and the setting they were cut for
([data] eval_tokens, [train] eval_batches, batch_size, seq_len). A run directory copied to another machine then
evaluates exactly as it did during training, from its own files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from qtrain.core.atomic import write_atomic
from qtrain.errors import DataError

EVAL_WINDOWS_FILE = "eval_windows.npz"


def save_eval_windows(data, run_dir: Path, eval_batches: int, batch_size: int, seq_len: int, eval_tokens: int = 0) -> Path:
    """Write the batches data.val_batches gives for this setting into run_dir (atomically); eval_tokens is
    [data] eval_tokens, recorded with the loop's setting so that `covers` can tell whether they still apply."""
    xs, ys = [], []
    for x, y in data.val_batches(eval_batches, batch_size, seq_len):
        xs.append(x.numpy().astype(np.int32))
        ys.append(y.numpy().astype(np.int32))
    x = np.concatenate(xs) if xs else np.empty((0, seq_len), np.int32)
    y = np.concatenate(ys) if ys else np.empty((0, seq_len), np.int32)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, setting=np.array([eval_tokens, eval_batches, batch_size, seq_len], np.int64))
    path = Path(run_dir) / EVAL_WINDOWS_FILE
    write_atomic(path, buf.getvalue())
    return path


@dataclass
class EvalWindows:
    """Stored validation batches: the evaluation interface of Dataset / FinetuneData (val_batches)."""

    x: np.ndarray  # (N, T) int32
    y: np.ndarray  # (N, T) int32, -100 = no loss
    setting: tuple[int, int, int, int]  # ([data] eval_tokens, [train] eval_batches, batch_size, seq_len)
    path: Path | None = None

    def covers(self, eval_tokens: int, eval_batches: int, batch_size: int, seq_len: int) -> bool:
        """True when these are the batches an evaluation with this setting would use."""
        return (eval_tokens, eval_batches, batch_size, seq_len) == self.setting

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The stored batches, as they were cut (the arguments are those of `covers`)."""
        for i in range(0, len(self.x), self.setting[2]):
            yield (torch.from_numpy(self.x[i : i + self.setting[2]].astype(np.int64)),
                   torch.from_numpy(self.y[i : i + self.setting[2]].astype(np.int64)))


def load_eval_windows(run_dir: Path) -> EvalWindows | None:
    """The run's stored validation batches, or None when it has none (a run from before they were kept)."""
    path = Path(run_dir) / EVAL_WINDOWS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return EvalWindows(f["x"], f["y"], tuple(int(v) for v in f["setting"]), path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is damaged ({e}); delete it: `qtrain eval` then reads the validation shards or "
                        f"the corpus") from None
