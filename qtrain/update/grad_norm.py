"""The global gradient norm of a step, measured on the device while the updates run, never synced.

Each norm lands in its own slot of one fp32 buffer: written as a by-product by a method whose statistics pass
already reads the whole gradient (APOLLO's, `Method.measures_grad_norm`: no launch of its own), once over the
flat staged gradients of a fused vector group (one launch for all the norm weights), or by `measure` (one
launch per tensor) for the rest. `take` is the norm of the slots. The Updater owns the meter
(`Updater.measure_grad_norm`), so it measures each gradient after any reduction and before its update.
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import Tensor


class GradNorm:
    """One fp32 slot per name (tensor or fused group); `take()` gives the step's global norm on the device.

    across_ranks: each rank sees a shard of every gradient (FSDP2): `take` sums the squares over ranks.
    """

    def __init__(self, device, names, across_ranks: bool = False):
        self.index = {name: i for i, name in enumerate(names)}
        self.norms = torch.zeros(len(self.index), device=device, dtype=torch.float32)
        self.across_ranks = across_ranks

    def slot(self, name: str) -> Tensor:
        """The 0-d view a kernel writes this name's norm into."""
        return self.norms[self.index[name]]

    def measure(self, name: str, grad: Tensor | None) -> None:
        """‖grad‖ in fp32 into its slot: one launch."""
        if grad is not None:
            torch.linalg.vector_norm(grad, dtype=torch.float32, out=self.slot(name))

    def take(self) -> Tensor:
        """The step's norm (a device scalar, not synced) and a reset for the next step."""
        if self.across_ranks:
            sum_sq = self.norms.square().sum()
            torch.distributed.all_reduce(sum_sq)  # SUM; asynchronous on the device with NCCL, no host sync
            norm = sum_sq.sqrt()
        else:
            norm = torch.linalg.vector_norm(self.norms)
        self.norms.zero_()
        return norm
