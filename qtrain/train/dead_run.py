"""A dead run: one that can no longer learn, stopped with the reason instead of running to the end.

Two signs, each read from the numbers every log window already brings to the host (no extra sync):
1. the global gradient norm is exactly 0 at every step: no gradient reaches any trained tensor, so no weight
   can change again (e.g. an LR far too high drove the activations into a state with zero gradient);
2. after the warmup, the loss stays within FLAT_NATS of ln(vocab_size), the loss of predicting the uniform
   distribution, at every step: the model has unlearned even the unigram frequencies, which a working run
   learns within its first few dozen steps at the peak LR. The warmup is excluded because a tiny LR from a
   near-uniform initialisation (the step-0 loss of `tiny` is 0.01 nats above ln(vocab)) also looks flat.
A run is stopped when either sign holds for `windows` consecutive log windows.
"""

from __future__ import annotations

import math

from qtrain.errors import TrainingError

FLAT_NATS = 1e-3  # a dead run sits at ln(V) up to fp32 rounding (~1e-6); a learning one leaves it by > 0.1


class DeadRunDetector:
    """check() once per log window with its host-side numbers; raises TrainingError on a dead run."""

    def __init__(self, vocab_size: int, warmup_steps: int, lr: float, windows: int = 3):
        self.uniform_loss = math.log(vocab_size)
        self.warmup_steps, self.lr, self.windows = warmup_steps, lr, windows
        self.zero_grad_windows = self.flat_windows = 0
        self.first_zero = self.first_flat = 0

    def check(self, steps: list[int], losses: list[float], grad_norms: list[float]) -> None:
        """steps: the window's step numbers (1-based, as logged), with each step's loss and grad norm."""
        if not steps:
            return
        if all(n == 0.0 for n in grad_norms):
            self.first_zero = self.first_zero if self.zero_grad_windows else steps[0]
            self.zero_grad_windows += 1
        else:
            self.zero_grad_windows = 0
        if steps[0] > self.warmup_steps and all(abs(x - self.uniform_loss) < FLAT_NATS for x in losses):
            self.first_flat = self.first_flat if self.flat_windows else steps[0]
            self.flat_windows += 1
        else:
            self.flat_windows = 0
        if self.zero_grad_windows >= self.windows:
            sign = (f"the gradient norm has been exactly 0 at every step since step {self.first_zero} "
                    f"({self.zero_grad_windows} log windows): no weight can change any more")
        elif self.flat_windows >= self.windows:
            sign = (f"the loss has stayed at ln(vocab_size) = {self.uniform_loss:.4f}, the loss of predicting every "
                    f"token as equally likely, at every step since step {self.first_flat} ({self.flat_windows} log "
                    f"windows after the warmup)")
        else:
            return
        raise TrainingError(
            f"the run is dead at step {steps[-1]}: {sign}, last loss {losses[-1]:.4f}. This usually means [optim] lr = "
            f"{self.lr:g} is far too high (the shipped recipes use 1e-3 to 1e-2; see docs/optimizers.md): lower it "
            f"and start a new run (--out NEW_DIR); a --resume would continue from the dead weights")
