"""Atomic, checksummed, keep-last-K training checkpoints: one safetensors file plus meta.json per step.

Layout under a run directory:
    checkpoints/step-00001200/tensors.safetensors   every tensor the trainer flattened (model, optimizer, ...)
    checkpoints/step-00001200/meta.json             the caller's meta + step, format_version, sha256, num_tensors
    checkpoints/latest                              "step-00001200\n", a hint only
    checkpoints/.tmp-*                              a save in progress (or one killed mid-write)

A sharded run (FSDP2) saves with torch.distributed.checkpoint (DCP) instead: every rank writes its blocks
(`__RANK_0.distcp`), rank 0 the `.metadata` index, and meta.json records `"layout": "dcp"`, the sha256 of every
file and each sharded tensor's dim. The same keys and unsharded shapes as the safetensors layout: one process
reads it whole (load_checkpoint), a sharded run reads only its blocks at any world size (load_shards; DCP
reshards).

A checkpoint becomes visible only through one os.replace of a complete, fsynced temp directory, so a crash
(SIGKILL, power loss after the fsyncs) leaves either the old set of checkpoints or the old set plus the new
one, never a half-written step-* directory. Older checkpoints are pruned only after the new one is in place.
This module knows nothing of models or optimizers: the trainer turns its state into tensors + JSON.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from qtrain.core.atomic import TMP_PREFIX, fsync_path, remove_scratch, replace_dir, write_atomic
from qtrain.errors import CheckpointError

FORMAT_VERSION = 1  # bump when meta.json or the tensor naming changes incompatibly
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "latest"
RESERVED_META_KEYS = ("step", "format_version", "sha256", "num_tensors", "layout", "files", "shard_dims")
DCP_LAYOUT, DCP_INDEX = "dcp", ".metadata"  # meta.json's "layout" of a sharded checkpoint; DCP's index file
DCP_COPY_AHEAD = 10_000_000  # bytes DCP's writer stages on the host ahead of the file write (CUDA tensors)
_STEP_DIR = re.compile(r"step-(\d{8,})")
_HASH_CHUNK = 1 << 24  # 16 MiB reads keep hashing a multi-GB file at disk speed without holding it in memory



@dataclass
class TrainingProgress:
    """Where training stands; stored in meta.json so a resumed run continues the same data and RNG streams."""

    step: int = 0
    """Optimizer updates done (not micro-batches)."""
    tokens_seen: int = 0
    """Training tokens consumed, padding excluded."""
    sampler: dict = field(default_factory=dict)
    """The data sampler's own state (JSON-able: epoch, offset, shuffle seed, ...)."""
    rng: dict = field(default_factory=dict)
    """RNG states, JSON-able (the trainer encodes torch generator states as base64 strings or lists)."""
    extra: dict = field(default_factory=dict)
    """Anything else JSON-able the trainer needs on resume (best eval loss, ...)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainingProgress:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(state) - names), sorted(names - set(state))
        if unknown or missing:
            raise CheckpointError(
                f"training progress has unknown keys {unknown} and is missing keys {missing}; "
                f"expected exactly {sorted(names)} (was the checkpoint written by another qtrain version?)"
            )
        return cls(**state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_disk_full(exc: BaseException) -> bool:
    # safetensors' Rust writer reports ENOSPC as SafetensorError("... (os error 28)"), not as an OSError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if f"os error {errno.ENOSPC}" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --- save ----------------------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step-* directory under root, newest step first; temp dirs are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _cpu_unaliased(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, no two sharing storage (safetensors refuses aliased tensors, e.g. tied weights)."""
    out, storages = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()  # a no-op for contiguous CPU tensors: they may still alias
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in storages:
            t = t.clone()  # a copy costs memory once; the loaded checkpoint holds two independent tensors
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete the oldest step dirs so that keep plus the keep_last - 1 newest others remain."""
    others = [p for _, p in _step_dirs(root) if p != keep]
    for old in others[keep_last - 1 :]:
        # rename first: a kill during rmtree then leaves a .tmp- dir, never a half-deleted step-* dir
        doomed = old.with_name(f"{TMP_PREFIX}del-{old.name}")
        try:
            os.replace(old, doomed)
            shutil.rmtree(doomed)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {old} ({e}); delete it by hand to free its space")


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep_last: int) -> Path:
    """Write run_dir/checkpoints/step-{step:08d}/ atomically, point `latest` at it, prune to keep_last; return it.

    tensors: any devices and dtypes; they are saved as contiguous CPU copies, bit-exact.
    meta: JSON-able; must not use the keys this function adds (RESERVED_META_KEYS).
    Re-saving an existing step replaces it. On any failure the previous checkpoints are untouched, the temp
    directory is removed, and CheckpointError says which checkpoint is intact (and, for a full disk, what to free).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last = {keep_last}: must be >= 1 (set [train] keep_last to 1 or more)")
    if step < 0:
        raise ValueError(f"step = {step}: must be >= 0")
    clashing = sorted(set(meta) & set(RESERVED_META_KEYS))
    if clashing:
        raise ValueError(f"meta uses reserved keys {clashing}; save_checkpoint sets {list(RESERVED_META_KEYS)} itself")
    meta_text = json.dumps(meta, indent=2, sort_keys=True)  # fail on non-JSON-able meta before touching disk

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_scratch(root)
    final = root / f"step-{step:08d}"
    existing = _step_dirs(root)
    previous = existing[0][1].name if existing else None
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    installed = False
    try:
        tmp.mkdir()
        tensors_path = tmp / TENSORS_FILE
        save_file(_cpu_unaliased(tensors), str(tensors_path), metadata={"format": "pt"})
        fsync_path(tensors_path)
        # hash the bytes on disk (not the tensors) so load_checkpoint can verify the file it reads
        full_meta = json.loads(meta_text) | {
            "step": step,
            "format_version": FORMAT_VERSION,
            "sha256": _sha256(tensors_path),
            "num_tensors": len(tensors),
        }
        _write_meta(tmp, full_meta)
        fsync_path(tmp)
        replace_dir(tmp, final)
        installed = True
        write_atomic(root / LATEST_FILE, f"{final.name}\n".encode())
    except BaseException as e:
        remove_scratch(root)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: scratch removed, propagate unchanged
        raise _save_failed(e, step, final, previous, installed) from e
    _prune(root, final, keep_last)
    return final


def sharded_save_transient_bytes(block_bytes: list[int], device_type: str) -> tuple[int, int]:
    """(device, host) bytes one rank's save_sharded_checkpoint holds beyond its state: DCP's writer (one thread)
    copies one block at a time to the host (on CUDA a stream copies up to DCP_COPY_AHEAD bytes ahead, at least
    one whole block) and writes it; no block is gathered or copied on the device. block_bytes: the rank's blocks
    (its shards of the weights and optimizer states, and the replicated tensors on rank 0)."""
    largest, total = max(block_bytes, default=0), sum(block_bytes)
    return 0, min(total, largest + (DCP_COPY_AHEAD if device_type == "cuda" else 0))


def save_transient_note(tensors: list[Tensor], shards: int, device_type: str) -> str:
    """The estimator's line on what one rank's sharded checkpoint save adds to the step's memory, for the
    unsharded persistent tensors of a model trained on `shards` ranks (each rank saves its torch.chunk blocks)."""
    blocks = [-(-t.shape[0] // shards) * (t.numel() // max(t.shape[0], 1)) * t.element_size() if t.dim() else
              t.element_size() for t in tensors]
    device, host = sharded_save_transient_bytes(blocks, device_type)
    return (f"sharded checkpoint save (torch.distributed.checkpoint): {device / 2**20:.0f} MiB on the device, "
            f"{host / 2**20:.1f} MiB of host memory per rank beyond its state (one block staged at a time; the "
            f"gathered format needed the largest whole tensor on the device and the whole state on rank 0's host)")


def _save_failed(e: BaseException, step: int, final: Path, previous: str | None, installed: bool) -> CheckpointError:
    intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    if installed:
        intact = f"{final.name} itself is complete (latest_checkpoint() finds it without the `latest` file)"
    if _is_disk_full(e):
        return CheckpointError(f"disk full while saving step {step} to {final}; {intact}; free space or lower "
                               f"train.keep_last")
    return CheckpointError(f"saving step {step} to {final} failed ({e}); {intact}")


def _write_meta(directory: Path, meta: dict) -> None:
    with open(directory / META_FILE, "wb") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())


def save_sharded_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict, keep_last: int) -> Path:
    """save_checkpoint for a sharded run, a collective: every rank calls it with its tensors (DTensors for
    sharded ones, the same plain tensor on every rank for replicated ones) and gets the checkpoint's path.

    Every rank writes its blocks with torch.distributed.checkpoint into one temp directory (which must be on a
    file system every rank sees), fsynced, and hashes its own files; rank 0 then writes meta.json (every file's
    sha256, each sharded tensor's dim) and renames the directory into place, as save_checkpoint does. A failure
    on any rank leaves the previous checkpoints untouched and raises CheckpointError on every rank.
    """
    import torch.distributed.checkpoint as dcp  # here, not at the top: ~1 s of imports that only sharded runs need
    rank = dist.get_rank()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    name: list = [None]
    if rank == 0:
        if keep_last < 1:
            raise ValueError(f"keep_last = {keep_last}: must be >= 1 (set [train] keep_last to 1 or more)")
        root.mkdir(parents=True, exist_ok=True)
        remove_scratch(root)
        name = [f"{TMP_PREFIX}{final.name}-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1,
                                                              per_thread_copy_ahead=DCP_COPY_AHEAD))
        mine = {p.name: _sha256(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    except Exception as e:  # DCP raises on every rank when one rank's write fails
        mine = {"": f"rank {rank}: {e}"}
    files: list = [None] * dist.get_world_size()
    dist.all_gather_object(files, mine)
    failed = [f[""] for f in files if "" in f]
    outcome: list = [None]
    if rank == 0:
        existing = [p for _, p in _step_dirs(root) if p.name != tmp.name]
        previous, installed = (existing[0].name if existing else None), False
        try:
            if failed:
                raise OSError("; ".join(failed))
            digests = {k: v for f in files for k, v in f.items()} | {DCP_INDEX: _sha256(tmp / DCP_INDEX)}
            shard_dims = {k: v.placements[0].dim for k, v in tensors.items() if isinstance(v, DTensor)}
            _write_meta(tmp, json.loads(json.dumps(meta)) | {
                "step": step, "format_version": FORMAT_VERSION, "layout": DCP_LAYOUT, "files": digests,
                "shard_dims": shard_dims, "num_tensors": len(tensors)})
            fsync_path(tmp)
            replace_dir(tmp, final)
            installed = True
            write_atomic(root / LATEST_FILE, f"{final.name}\n".encode())
            _prune(root, final, keep_last)
        except Exception as e:
            remove_scratch(root)
            outcome = [str(_save_failed(e, step, final, previous, installed))]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return final


# --- load ----------------------------------------------------------------------------------------------------


def read_meta(path: Path) -> dict:
    """meta.json of the checkpoint dir path, unverified (cheap: the tensors are not read)."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META_FILE}: {e}") from e
    for name in meta["files"] if is_sharded(meta) else [TENSORS_FILE]:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {meta.get('format_version')!r}; "
            f"this qtrain reads format_version {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors on CPU, meta) of the checkpoint directory path, after verifying its sha256 (read once). A
    sharded checkpoint is read whole, every tensor unsharded (export, eval, a one-process resume).

    Raises CheckpointError, naming path, if a file is missing, the checksum differs or the tensor count is off.
    """
    path = Path(path)
    meta = read_meta(path)
    if is_sharded(meta):
        verify_files(path, meta)
        return load_shards(path, meta), meta
    actual = _sha256(path / TENSORS_FILE)
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: sha256 of {TENSORS_FILE} is {actual}, "
            f"meta.json records {meta.get('sha256')}"
        )
    tensors = load_file(str(path / TENSORS_FILE), device="cpu")
    if len(tensors) != meta.get("num_tensors"):
        raise CheckpointError(
            f"checkpoint {path} holds {len(tensors)} tensors, meta.json records {meta.get('num_tensors')}"
        )
    return tensors, meta


def is_sharded(meta: dict) -> bool:
    """Whether a checkpoint (its meta.json) was written by torch.distributed.checkpoint, one file per rank."""
    return meta.get("layout") == DCP_LAYOUT


def verify_files(path: Path, meta: dict) -> None:
    """Hash every file of a sharded checkpoint against meta.json; CheckpointError names the first that differs."""
    for name, expected in sorted(meta["files"].items()):
        actual = _sha256(path / name)
        if actual != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: sha256 of {name} is {actual}, meta.json records "
                                  f"{expected}")


def load_shards(path: Path, meta: dict, mesh=None) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint: unsharded on the CPU (mesh None: this process alone reads it), or
    with a device mesh (a collective) each sharded tensor as this rank's torch.chunk block along its dim, the
    way FSDP2 shards it, whatever the world size that saved it (DCP reads the overlapping parts of its files)."""
    import torch.distributed.checkpoint as dcp  # as in save_sharded_checkpoint
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    rank, size = (0, 1) if mesh is None else (mesh.get_local_rank(), mesh.size())
    device = "cpu" if mesh is None else mesh.device_type
    templates: dict[str, Tensor] = {}
    for key, md in stored.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {path} holds a non-tensor entry {key!r}; qtrain keeps those in meta.json")
        dim = meta["shard_dims"].get(key) if mesh is not None else None
        if dim is None:
            templates[key] = torch.empty(md.size, dtype=md.properties.dtype, device=device)
            continue
        shape = list(md.size)
        per = -(-shape[dim] // size)
        shape[dim] = max(0, min(shape[dim], (rank + 1) * per) - rank * per)
        local = torch.empty(shape, dtype=md.properties.dtype, device=device)
        templates[key] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=md.size,
                                            stride=torch.empty(md.size, device="meta").stride())
    dcp.load(templates, storage_reader=dcp.FileSystemReader(path), no_dist=mesh is None)
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in templates.items()}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every step-* checkpoint directory of run_dir, newest step first (unverified; scratch dirs excluded)."""
    return [p for _, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR)]


def load_latest(run_dir: Path, accept=None, read_shards: bool = True) -> tuple[Path, dict[str, Tensor] | None, dict] | None:
    """(path, tensors, meta) of the newest checkpoint that verifies, each file hashed once; None if there is none.

    read_shards=False: a sharded checkpoint is verified but not read (tensors None): a sharded run reads only
    its blocks of it (load_shards).

    accept(path, meta) may raise to refuse a checkpoint before its tensors are read (a recipe that cannot
    resume it): that error propagates. A damaged checkpoint is skipped with a warning naming it; when
    checkpoints exist but none verifies, CheckpointError lists every failure instead of starting over.
    The `latest` file is only a hint and is not trusted.
    """
    failures = []
    for path in checkpoint_dirs(run_dir):
        try:
            meta = read_meta(path)
            if accept is not None:
                accept(path, meta)
            if is_sharded(meta) and not read_shards:
                verify_files(path, meta)
                tensors = None
            else:
                tensors, meta = load_checkpoint(path)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for failure in failures:
            warnings.warn(f"skipped damaged checkpoint: {failure}")
        return path, tensors, meta
    if failures:
        raise CheckpointError("no checkpoint in " + str(run_dir) + " can be loaded:\n  " + "\n  ".join(failures)
                              + "\nRestore a good copy, or delete the checkpoints directory to start from step 0")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step-* checkpoint under run_dir/checkpoints that verifies (hashes its tensors), or None."""
    for path in checkpoint_dirs(run_dir):
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}")
            continue
        return path
    return None
