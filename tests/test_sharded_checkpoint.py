"""Sharded checkpoints (torch.distributed.checkpoint) in qtrain.checkpoint.store, in this process (gloo, world 1):
atomic install, keep_last, checksums, whole and per-rank reads. The 2-rank runs are in tests/test_fsdp.py."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from qtrain.checkpoint.store import (
    checkpoint_dirs,
    load_checkpoint,
    load_latest,
    load_shards,
    read_meta,
    save_sharded_checkpoint,
)
from qtrain.errors import CheckpointError


@pytest.fixture(scope="module")
def mesh():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _state(mesh, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    codes = torch.randint(0, 256, (6, 4), generator=g, dtype=torch.uint8)
    moments = torch.randn(2, 5, generator=g)
    return {"model/codes": DTensor.from_local(codes, mesh, [Shard(0)]),
            "optim/exp_avg": DTensor.from_local(moments, mesh, [Shard(1)]),
            "optim/step": torch.tensor(float(step))}


def test_saved_atomically_kept_last_and_read_whole(mesh, tmp_path):
    for step in (1, 2, 3):
        path = save_sharded_checkpoint(tmp_path, step, _state(mesh, step), {"note": step}, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    meta = read_meta(path)
    assert meta["layout"] == "dcp" and meta["step"] == 3 and meta["note"] == 3
    assert meta["shard_dims"] == {"model/codes": 0, "optim/exp_avg": 1}
    tensors, _ = load_checkpoint(path)  # no process group needed: read whole
    want = _state(mesh, 3)
    assert tensors.keys() == want.keys()
    for k, v in want.items():
        v = v.to_local() if isinstance(v, DTensor) else v
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    local = load_shards(path, meta, mesh)  # one rank of one: its block is the whole tensor
    assert torch.equal(local["model/codes"], want["model/codes"].to_local())


def test_corrupt_shard_is_named_and_skipped(mesh, tmp_path):
    for step in (1, 2):
        save_sharded_checkpoint(tmp_path, step, _state(mesh, step), {}, keep_last=3)
    shard = tmp_path / "checkpoints" / "step-00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp"):
        load_checkpoint(shard.parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, tensors, meta = load_latest(tmp_path, read_shards=False)
    assert path.name == "step-00000001" and tensors is None and meta["step"] == 1
    assert any("__0_0.distcp" in str(w.message) for w in caught)
    (tmp_path / "checkpoints" / "step-00000001" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000001")


def test_save_transient_is_one_staged_block_and_reaches_the_estimate():
    from qtrain.checkpoint.store import DCP_COPY_AHEAD, sharded_save_transient_bytes
    from qtrain.estimate.memory import estimate

    assert sharded_save_transient_bytes([10, 30, 20], "cpu") == (0, 30)  # one block at a time, nothing on device
    assert sharded_save_transient_bytes([10, 30, 20], "cuda") == (0, 60)  # copy-ahead, capped by the state
    assert sharded_save_transient_bytes([DCP_COPY_AHEAD] * 3, "cuda") == (0, 2 * DCP_COPY_AHEAD)
    notes = [n for n in estimate("tiny", "cuda", nproc=2, fsdp=True).notes if n.startswith("sharded checkpoint")]
    assert len(notes) == 1 and "0 MiB on the device" in notes[0]
    assert not [n for n in estimate("tiny", "cuda", nproc=2).notes if n.startswith("sharded checkpoint")]
