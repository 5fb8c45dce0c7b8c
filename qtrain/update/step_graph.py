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
from qtrain.update.step import train_step
from qtrain.update.updater import Updater

WARMUP_STEPS = 3  # eager steps before the capture: the first creates state, the next ones settle caches


class CapturedStep:
    """Call after `updater.begin_step(...)`: forward, backward (release updates inside) and finish_step of one
    step (qtrain.update.step.train_step, the eager loop's body), eager for the first WARMUP_STEPS calls, then
    captured once and replayed. Returns the step's loss. Off CUDA nothing is captured: every call is eager."""

    def __init__(self, model: nn.Module, updater: Updater, device: torch.device, dtype: torch.dtype,
                 world_size: int = 1, warmup: int = WARMUP_STEPS):
        found = rules.cuda_graph_device(torch.device(device).type, world_size)  # checked at launch: a guard here
        if found:
            raise TrainingError("; ".join(found))
        self.model, self.updater, self.dtype = model, updater, dtype
        self.capturing = torch.device(device).type == "cuda"
        self.eager_left = warmup
        self.side: torch.cuda.Stream | None = None  # the warm-up stream, one for every warm-up step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, Tensor] | None = None
        self.loss: Tensor | None = None
        self.replays = 0

    @property
    def settling(self) -> bool:
        """True until the capture step has run (warm-up: compilation, autotuning, lazy state; then the capture):
        steps whose time says nothing about the replayed step's speed."""
        return self.capturing and self.replays == 0

    @property
    def steps_to_capture(self) -> int:
        """Calls until the graph exists (warm-up steps + the capture step)."""
        return self.eager_left + 1 if self.graph is None else 0

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # cached casts must not outlive a captured region
        try:
            return train_step(self.model, self.updater, [(x, y)], self.dtype)
        finally:
            torch.set_autocast_cache_enabled(cache)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.capturing:
            return self._step(x, y)
        if self.eager_left > 0:
            self.eager_left -= 1
            if self.side is None:
                # warm-up on a side stream, as torch.cuda.graph's documentation asks; one stream for all of them:
                # a new one per step would keep each step's freed blocks in its own pool (up to 3x the transients)
                self.side = torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self._step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
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
