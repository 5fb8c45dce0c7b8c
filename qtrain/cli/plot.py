"""`qtrain plot RUN`: one PNG of a run's metrics.jsonl: train/val loss, learning rate, tokens/s, gradient norm.

matplotlib is an optional extra (`pip install -e ".[plot]"`); nothing else in qtrain imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtrain.errors import TrainingError
from qtrain.train.metrics import METRICS_FILE

PLOT_FILE = "metrics.png"


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise TrainingError(f"{run_dir} has no {METRICS_FILE}; pass the --out DIR of a `qtrain train` run")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line of a killed run
            continue
    return rows


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the PNG (default RUN/metrics.png) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainingError('qtrain plot needs matplotlib: pip install "qtrain[plot]" (or pip install matplotlib)') from None
    rows = read_rows(run_dir)
    train = [r for r in rows if "loss" in r]
    if not train:
        raise TrainingError(f"{run_dir}/{METRICS_FILE} holds no training step yet; plot again after a few steps")
    val = [r for r in rows if "val_loss" in r]
    perf = [r for r in train if "tok_s" in r]
    steps = [r["step"] for r in train]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train (per step)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", lw=1.5, label="validation")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    ax = axes[0][1]
    ax.plot(steps, [r["lr"] for r in train], lw=1.2)
    ax.set(title="learning rate (matrices)", xlabel="step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax = axes[1][0]
    if perf:
        ax.plot([r["step"] for r in perf], [r["tok_s"] for r in perf], "o-", ms=3, lw=1)
    ax.set(title="training throughput (per log window)", xlabel="step", ylabel="tokens/s")
    ax.set_ylim(bottom=0)
    ax = axes[1][1]
    with_norm = [r for r in train if r.get("grad_norm") is not None]
    if with_norm:
        ax.plot([r["step"] for r in with_norm], [r["grad_norm"] for r in with_norm], lw=0.8)
    ax.set(title="global gradient norm (before clipping)", xlabel="step")
    fig.suptitle(f"qtrain run {Path(run_dir).resolve().name}")
    out = Path(out) if out else Path(run_dir) / PLOT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
