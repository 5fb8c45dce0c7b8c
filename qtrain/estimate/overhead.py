"""What the CUDA process holds beyond the step's own tensors: the allocator's rounding and cached blocks, the context.

Outside what a CPU machine can measure: assumptions for CUDA, to calibrate with tools/validate_estimator.py on a
GPU (it prints the measured context and reserved - allocated).
"""

from __future__ import annotations

import torch

from qtrain.estimate.breakdown import Component, MiB

CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context + cuBLAS/cuDNN handles of a torch 2.x process (nvidia-smi)
ALLOCATOR_SLACK = 0.05  # share of the step's transients held in cached blocks too small for the next request
# CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp): blocks are multiples of 512 B; a request of
# 10 MiB or more gets its own segment rounded up to 2 MiB, and a tail of at most 1 MiB is not split off,
# so it counts as allocated.
CUDA_BLOCK, CUDA_LARGE_ALLOC, CUDA_ROUND_LARGE, CUDA_SMALL_SIZE = 512, 10 * MiB, 2 * MiB, 1 * MiB


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator accounts as allocated for one tensor of nbytes."""
    block = -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK
    if block >= CUDA_LARGE_ALLOC:
        segment = -(-block // CUDA_ROUND_LARGE) * CUDA_ROUND_LARGE
        if segment - block <= CUDA_SMALL_SIZE:  # remainder too small to split off
            block = segment
    return block


def allocator_components(device_type: str, persistent_tensors: list[torch.Tensor], peak_phase_bytes: int
                         ) -> list[Component]:
    """The rounding of the persistent blocks (inside max_memory_allocated), the cached blocks not reusable for
    later sizes (reserved - allocated) and the CUDA context (outside both); none on CPU."""
    cuda = device_type == "cuda"
    rounding = sum(cuda_block_bytes(t.numel() * t.element_size()) - t.numel() * t.element_size()
                   for t in persistent_tensors) if cuda else 0
    return [
        Component("allocator rounding of persistent blocks (in allocated)", rounding, "overhead",
                  "CUDACachingAllocator: 512 B blocks, unsplit < 1 MiB tails of large segments"),
        Component("allocator fragmentation (reserved - allocated)", int(ALLOCATOR_SLACK * peak_phase_bytes) if cuda
                  else 0, "overhead", "CUDACachingAllocator: cached blocks not reusable for later sizes (assumed share)"),
        Component("CUDA context (outside max_memory_allocated)", CUDA_CONTEXT_BYTES if cuda else 0, "overhead",
                  "cuda init, cuBLAS/cuDNN"),
    ]
