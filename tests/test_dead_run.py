"""A dead run (zero gradient, or the loss pinned at ln(vocab)) stops with the reason and the fix."""

import math
import os
import subprocess
import sys

import pytest

from qtrain.errors import TrainingError
from qtrain.train.dead_run import FLAT_NATS, DeadRunDetector

V = 512
UNIFORM = math.log(V)


def windows(detector, rows, first=0):
    """Feed log windows of 10 steps from window `first`: rows = [(loss, grad norm)] per window, at each step."""
    for w, (loss, norm) in enumerate(rows, start=first):
        steps = list(range(10 * w + 1, 10 * w + 11))
        detector.check(steps, [loss] * 10, [norm] * 10)


def test_zero_gradient_for_three_windows_stops_naming_lr_and_fix():
    d = DeadRunDetector(V, warmup_steps=60, lr=1e6)
    windows(d, [(UNIFORM, 0.0)] * 2)  # two windows: not yet
    with pytest.raises(TrainingError, match=r"dead at step 30: the gradient norm has been exactly 0 at every step "
                                            r"since step 1 .*\[optim\] lr = 1e\+06 is far too high.*--out NEW_DIR"):
        windows(d, [(UNIFORM, 0.0)], first=2)


def test_loss_flat_at_uniform_counts_only_after_warmup():
    d = DeadRunDetector(V, warmup_steps=20, lr=0.01)
    windows(d, [(UNIFORM + 1e-4, 0.5)] * 4)  # windows 1-2 in the warmup, 3-4 after it: two flat windows
    with pytest.raises(TrainingError, match=rf"loss has stayed at ln\(vocab_size\) = {UNIFORM:.4f}.* since step 21"):
        windows(d, [(UNIFORM - 1e-4, 0.5)], first=4)


def test_healthy_numbers_never_stop_a_run():
    d = DeadRunDetector(V, warmup_steps=0, lr=0.01)
    # near-uniform init (the tests' step-0 loss is 6e-4 above ln V) with a live gradient, then learning
    windows(d, [(UNIFORM + 6e-4, 0.9), (UNIFORM + 2 * FLAT_NATS, 0.8)] + [(UNIFORM - 1.0, 0.5)] * 10)
    # a zero gradient or a flat loss that does not last three windows in a row
    windows(d, [(UNIFORM, 0.0), (UNIFORM, 0.0), (5.0, 0.3), (UNIFORM, 0.0), (UNIFORM, 0.0), (5.0, 0.3)], first=12)
    d.check([200], [UNIFORM], [0.0])
    d.check([], [], [])  # an empty window changes nothing


@pytest.mark.slow
def test_lr_1e6_run_stops_with_the_reason_and_shows_its_threads(tmp_path):
    # it ran all its steps at loss ln(512) with grad norm 0 and exited 0; the header now shows the CPU threads
    flags = ["data.max_corpus_chars=300000", "model.vocab_size=512", "train.sample_tokens=0", "train.eval_batches=2",
             "train.batch_size=4", "train.seq_len=64", "model.max_seq_len=64", "optim.lr=1e6", "train.steps=600",
             "train.eval_every=1000", "train.save_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "qtrain", "train", "--out", str(tmp_path / "run"),
                           *[f"--set={f}" for f in flags]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "qtrain: device: cpu (float32 compute, 1 CPU thread: set OMP_NUM_THREADS to change)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert ("error: the run is dead at step 40: the gradient norm has been exactly 0 at every step since step 11 "
            "(3 log windows): no weight can change any more, last loss 6.2383. This usually means [optim] lr = 1e+06 "
            "is far too high") in proc.stderr
