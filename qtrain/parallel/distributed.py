"""Data parallel on torch.distributed with replicated int8 weights and layer-wise release ("DDP without DDP").

No DistributedDataParallel wrapper: its buckets would hold a full copy of the gradients (defeating layer-wise
release) and its all-reduce would run after the post-accumulate hooks that update the weights. Instead every
final gradient is all-reduced (SUM) inside the Updater's gradient hook, right before that tensor's update,
and every rank runs the same update. The loss is scaled by 1 / world_size before backward (torchtune's
convention; ReduceOp.AVG is NCCL-only), so the summed gradient is the global mean.

Why replicas stay identical: random projections and stochastic rounding are pure functions of (seed, tensor,
step) (qtrain.core.seeding), and an all-reduce gives every rank the same sum; `check_replicas` verifies it cheaply
every log_every steps. With 2 ranks the sum is one IEEE addition, so a 2-rank run equals a 1-process run with
grad_accum_steps = 2 bit for bit (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtrain.errors import TrainingError

DEFAULT_TIMEOUT_S = 300  # a dead or hung peer ends every rank's run with an error after this long


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False  # FSDP2 (qtrain.parallel.fsdp): each rank holds a shard of the weights, not a replica

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, logs, evaluates and writes into the run directory."""
        return self.rank == 0


def launched_world() -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) with a bounded collective timeout."""
    if world.size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died, hung (timeout) or closed its connection."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


@contextlib.contextmanager
def sigterm_as_error(world: World, message: str):
    """Under torchrun, SIGTERM raises TrainingError(message) in the main thread instead of ending the process
    without a word: torchrun stops every other rank with SIGTERM when one rank fails, which may reach a rank
    before its own collective reports the dead peer (a scheduler preempting the job sends it too)."""
    if world.size == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TrainingError(f"rank {world.rank}: stopped by SIGTERM (torchrun stops every rank when one fails; a "
                            f"scheduler may have preempted the job). {message}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def release_sharded_state() -> None:
    """Before shutdown() after an FSDP2 run: its module state sits in reference cycles that hold the process
    group; left to interpreter exit, gloo's threads were sometimes torn down unjoined ("terminate called
    without an active exception", SIGABRT). Collected here, the group is destroyed by shutdown(). Not on the
    error path: a collection there delays the message a failed peer should print before torchrun stops us."""
    gc.collect()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_grad_(name: str, grad: Tensor) -> None:
    """All-reduce (SUM) one final gradient in place; the loss was already scaled by 1 / world_size."""
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)


class OverlappedReducer:
    """Release mode: start each gradient's all-reduce at once (async) and apply its update later.

    Up to `inflight` reductions run while backward computes the next gradients; the oldest is waited for
    and its update applied when one more arrives, and the rest at the end of backward (an autograd engine
    callback, the way DDP flushes its buckets). Every rank submits in the same order (identical replicas
    run identical backward passes), so the collectives match. Same sums as reducing synchronously.
    """

    def __init__(self, inflight: int):
        self.inflight = inflight
        self.queue: deque = deque()
        self.wait_s = 0.0  # host time spent waiting for reductions (what overlap did not hide)
        self._flush_queued = False

    def submit(self, grad: Tensor, apply) -> None:
        work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)
        self.queue.append((work, apply))
        if not self._flush_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._flush_queued = True
        while len(self.queue) > self.inflight:
            self._apply_oldest()

    def _apply_oldest(self) -> None:
        work, apply = self.queue.popleft()
        t0 = time.perf_counter()
        work.wait()
        self.wait_s += time.perf_counter() - t0
        apply()

    def flush(self) -> None:
        while self.queue:
            self._apply_oldest()
        self._flush_queued = False


def sum_across_ranks(t: Tensor) -> Tensor:
    """t summed over ranks (a copy; for logged losses)."""
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_same_recipe(world: World, recipe_text: str) -> None:
    """Refuse to start when the ranks were given different recipes (each rank reads its own arguments)."""
    if world.size == 1:
        return
    digest = hashlib.sha256(recipe_text.encode()).hexdigest()
    digests: list = [None] * world.size
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise TrainingError(f"ranks {differing} were started with a recipe (or --set overrides) that differs from "
                            f"rank 0's; launch every rank with the same command line")


def replica_checksums(model: nn.Module) -> Tensor:
    """One int64 per state tensor: the sum of its bit patterns (cheap, order-free, sensitive to any bit flip
    of one element)."""
    sums = []
    for t in model.state_dict().values():
        flat = t.detach().reshape(-1)
        bits = flat.view(torch.int32) if flat.element_size() == 4 else (
            flat.view(torch.int16) if flat.element_size() == 2 else flat.view(torch.uint8))
        sums.append(bits.sum(dtype=torch.int64))
    return torch.stack(sums)


def check_replicas(model: nn.Module, world: World, step: int) -> None:
    """Raise TrainingError on every rank if any rank's weights differ from rank 0's (one small all-gather).
    Sharded weights (FSDP2) differ by design: nothing to check."""
    if world.size == 1 or world.sharded:
        return
    mine = replica_checksums(model)
    if dist.get_backend() == "nccl":  # NCCL takes CUDA tensors only (FSDP2 checks a model built in host memory)
        mine = mine.cuda()
    gathered = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    names = list(model.state_dict())
    for r, other in enumerate(gathered[1:], start=1):
        bad = (other != gathered[0]).nonzero().flatten().tolist()
        if bad:
            raise TrainingError(f"replicas diverged at step {step}: rank {r} holds different {names[bad[0]]} "
                                f"({len(bad)} tensors differ) from rank 0; every rank must run the same code, "
                                f"kernels and recipe (a mixed GPU type or torch version can cause this)")
