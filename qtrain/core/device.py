"""Where a run computes: the device, the autocast dtype, how host batches get there, and its free memory."""

from __future__ import annotations

import os

import torch

from qtrain.errors import TrainingError


def resolve_device(want: str) -> torch.device:
    """[train] device ("auto" | "cpu" | "cuda") -> a torch device; "cuda" without a GPU is an error."""
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError('[train] device = "cuda" but no CUDA GPU is visible to torch '
                            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); "
                            'set train.device = "cpu" (or "auto"), or install a CUDA build of torch (README)')
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast_dtype(want: str, device: torch.device) -> torch.dtype:
    """[train] dtype ("auto" | "bfloat16" | "float32") -> the compute dtype (bf16 on CUDA, fp32 on CPU for auto)."""
    if want == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[want]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; on CUDA through pinned memory so the copy is asynchronous (no host sync)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on device: CUDA's free memory, or the host's MemAvailable (Linux;
    elsewhere the free physical pages, which leave out reclaimable caches: an underestimate, never over)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
