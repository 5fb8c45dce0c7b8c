"""The run's metric log: metrics.jsonl (one JSON object per row) and, when installed, TensorBoard.

A resumed run first drops the rows that the interrupted run wrote after its last checkpoint, so the log
stays one series with each step once: metrics.jsonl is rewritten atomically, TensorBoard purges its
events past that step (SummaryWriter's purge_step).
"""

from __future__ import annotations

import json
from pathlib import Path

from qtrain.atomic import write_atomic

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
