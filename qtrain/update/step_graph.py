"""[train] cuda_graph: one training step captured in a CUDA graph once, then replayed every step.

A release step is thousands of small launches (forward, backward, and every tensor's update inside its
release hook); replaying a graph issues them with one host call. What makes the replay correct is that
nothing of the step's own depends on a host number: the LRs, the step count and the SR seeds are device
tensors that `Updater.begin_step` rewrites in place before each step (qtrain.core.step_state), and APOLLO's
projections are kept buffers redrawn in place, also in begin_step, when their window ends. Both run eagerly,
outside the graph, so the graph reads each step's values.

The sequence: WARMUP_STEPS eager steps (lazy optimizer state, Triton compilation and autotuning, cuBLAS
workspaces), then one capture, whose Python runs once with the device work only recorded, replayed at once
for that step; every later step copies its batch into the captured input buffers and replays. Capture runs
the step's Python (the host counters advance); a replay does not, so `Updater.replayed` advances them.
Not yet run on a GPU (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qtrain.config import rules
from qtrain.errors import TrainingError
from qtrain.model.loss import lm_loss
from qtrain.update.updater import Updater

WARMUP_STEPS = 3  # eager steps before the capture: the first creates state, the next ones settle caches


class CapturedStep:
    """Call after `updater.begin_step(...)`: forward, backward (release updates inside) and finish_step of one
    step, eager for the first WARMUP_STEPS calls, then captured once and replayed. Returns the step's loss."""

    def __init__(self, model: nn.Module, updater: Updater, device: torch.device, dtype: torch.dtype,
                 world_size: int = 1, warmup: int = WARMUP_STEPS):
        found = rules.cuda_graph_device(torch.device(device).type, world_size)  # checked at launch: a guard here
        if found:
            raise TrainingError("; ".join(found))
        self.model, self.updater, self.dtype = model, updater, dtype
        self.eager_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, Tensor] | None = None
        self.loss: Tensor | None = None
        self.replays = 0

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # cached casts must not outlive a captured region
        try:
            loss = lm_loss(self.model, x, y, self.dtype)
        finally:
            torch.set_autocast_cache_enabled(cache)
        loss.backward()  # release mode: every tensor is updated in here
        self.updater.finish_step()
        return loss.detach()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.eager_left > 0:
            self.eager_left -= 1
            if not x.is_cuda:
                return self._step(x, y)
            side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.inputs = (x.clone(), y.clone())  # the captured batch buffers: later batches are copied in
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step(*self.inputs)
        else:
            for buffer, batch in zip(self.inputs, (x, y)):
                buffer.copy_(batch)
        self.graph.replay()  # after the capture too: capturing records the step, it does not run it
        if self.replays:
            self.updater.replayed()
        self.replays += 1
        return self.loss.clone()  # the next replay overwrites self.loss
