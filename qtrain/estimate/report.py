"""The text report of a Breakdown (`qtrain estimate` without --json)."""

from __future__ import annotations

from qtrain.estimate.breakdown import Breakdown, Component, GiB, MiB


def _size(n: int) -> str:
    return f"{n / GiB:7.3f} GiB" if n >= GiB else f"{n / MiB:7.1f} MiB"


def format_breakdown(b: Breakdown) -> str:
    lines = [f"qtrain estimate: {b.recipe}", f"device {b.device_type}, compute dtype {b.compute_dtype}", ""]
    width = max(len(c.name) for c in b.components + [Component(p.name, 0, "", "") for p in b.phases]) + 2
    lines.append(f"  {'component':<{width}}{'bytes':>11}  {'kind':<11} models")
    for kind in ("persistent", "activation", "transient", "overhead"):
        lines += [f"  {c.name:<{width}}{_size(c.bytes)}  {kind:<11} {c.code_path}" for c in b.components
                  if c.kind == kind]
    lines += ["", "  phases of one step (non-persistent bytes alive):"]
    lines += [f"  {p.name:<{width}}{_size(p.bytes)}" + ("  <- peak" if p.name == b.peak_phase else "")
              for p in b.phases]
    lines += [
        "",
        f"  {'persistent':<{width}}{_size(b.persistent_bytes)}",
        f"  {'peak allocated':<{width}}{_size(b.peak_allocated)}  torch.cuda.max_memory_allocated",
        f"  {'peak reserved':<{width}}{_size(b.peak_reserved)}  torch.cuda.max_memory_reserved",
        f"  {'total on the GPU':<{width}}{_size(b.total_on_gpu)}  reserved + CUDA context (nvidia-smi)",
        f"  peak phase: {b.peak_phase}; its largest component: {b.peak_component}",
        f"  largest component: {b.largest_component}",
    ]
    if b.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in b.notes]
    return "\n".join(lines)
