"""What several processes add to one GPU's step: communication buffers, gradients in flight, FSDP2's units.

nproc > 1 without FSDP: weights and optimizer states are replicated and each gradient is all-reduced in place
inside its release hook (qtrain.parallel.distributed), so the per-GPU figure is the single-GPU one plus NCCL's
buffers and, with dp_overlap, the gradients awaiting their all-reduce. With FSDP2 (qtrain.parallel.fsdp) every
persistent tensor counts one rank's shard (qtrain.estimate.persistent) and the step adds what FSDP2 holds beyond
one GPU's run (`fsdp_unit_bytes`).
"""

from __future__ import annotations

from qtrain.config import rules
from qtrain.config.recipe import TrainConfig
from qtrain.estimate.breakdown import Component, MiB
from qtrain.model.builder import META_DTYPES
from qtrain.update.updater import Updater

# NCCL's own buffers for a data-parallel process (an assumption until measured: NCCL_BUFFSIZE 4 MiB x up to
# 16 channels x send + receive); outside the torch allocator, like the context.
NCCL_BUFFER_BYTES = 128 * MiB


def parallel_components(cfg: TrainConfig, updater: Updater, device_type: str, nproc: int, shards: int,
                        compute_itemsize: int) -> list[Component]:
    """The components a run over nproc processes (shards > 1: FSDP2 over that many ranks) adds per GPU.

    Kinds: "transient" ones add to the peak (they are alive at it, as upper bounds); "overhead" ones sit outside
    the torch allocator (total on the GPU only).
    """
    comps = [Component("communication buffers (outside max_memory_allocated)",
                       NCCL_BUFFER_BYTES if device_type == "cuda" and nproc > 1 else 0, "overhead",
                       "qtrain.parallel.distributed: in-place all_reduce of each gradient; NCCL's own buffers")]
    # Data parallel with release and dp_overlap: up to dp_overlap gradients wait for their all-reduce while
    # backward goes on (qtrain.parallel.distributed.OverlappedReducer). Bounded by that many of the largest gradient
    # (an upper bound: which gradients are in flight at the peak is not modelled). FSDP2 reduce-scatters instead.
    in_flight = 0
    if nproc > 1 and shards == 1 and cfg.train.release and cfg.train.dp_overlap > 0:
        grads = [l.codes.numel() * compute_itemsize for l in updater.int8.values()]
        grads += [p.numel() * p.element_size() for p in updater.floats.values()]
        in_flight = cfg.train.dp_overlap * max(grads)
    comps.append(Component("gradients awaiting their all-reduce (data parallel, upper bound)", in_flight,
                           "transient", "OverlappedReducer: [train] dp_overlap gradients in flight"))
    comps.append(Component("FSDP2 gathered unit + prefetch, its gradients and reduce-scatter buffers",
                           fsdp_unit_bytes(cfg, updater, shards) if shards > 1 else 0, "transient",
                           "fully_shard units (qtrain.parallel.fsdp): see estimate.parallel.fsdp_unit_bytes"))
    # A checkpoint save's transients per rank (the DCP save of a sharded run) belong here, as one more
    # Component: the estimate adds every "transient" of this list to the step's peak.
    return comps


def fsdp_notes(cfg: TrainConfig, shards: int) -> list[str]:
    found = rules.fsdp_problems(cfg, shards)  # the trainer's own checks
    note = (f"FSDP2 over {shards} ranks: weights, float tensors and optimizer states are this rank's shards; "
            f"the gathered unit is an upper bound (one projection's gradient is counted twice)")
    return [note] + [f"qtrain train --fsdp refuses this recipe as it stands: {p}" for p in found]


def fsdp_unit_bytes(cfg: TrainConfig, updater, shards: int) -> int:
    """What FSDP2 holds beyond a one-GPU step, at its largest unit (qtrain.parallel.fsdp: one unit per block, the
    embedding and lm_head one each). A block: its int8 weights gathered, twice (the next block's all-gather is
    prefetched), the dW of all its projections (in the float tensors' dtype, which an Int8Weight presents),
    alive until the block's reduce-scatter, the reduce-scatter's input copy of them and its 1/shards output.
    The embedding or lm_head: the gathered float weight and the reduce-scatter's copy and output of its
    gradient (the gradient itself is the one-GPU run's). An upper bound: the one-GPU phases already count one
    projection's gradient."""
    block = [l for n, l in updater.int8.items() if ".layers.0." in n]
    weights = sum(t.numel() * t.element_size() for l in block for t in (l.codes, l.scale, l.offset))
    g = META_DTYPES[cfg.model.float_dtype].itemsize
    grads = sum(l.codes.numel() * g for l in block)
    unit = 2 * weights + grads * (2 + 1 / shards)
    for name, p in updater.floats.items():
        if p.dim() == 2 and ".layers." not in name:  # embedding, lm_head
            unit = max(unit, p.numel() * p.element_size() * (2 + 1 / shards))
    return int(unit)

