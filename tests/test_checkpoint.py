"""qtrain.checkpoint.store: bit-exact round trip, pruning, failure injection, corruption, and a real SIGKILL mid-save."""

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qtrain.checkpoint import store as checkpoint
from qtrain.checkpoint.store import (
    CheckpointError,
    TrainingProgress,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of t, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _listing(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _payload(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), float(step)), "step": torch.tensor(step)}


def test_round_trip_is_bit_exact(tmp_path):
    bf16 = torch.randn(7, 5).to(torch.bfloat16)
    bf16[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    tied = torch.randn(16, 8)
    tensors = {
        "codes": torch.randint(0, 256, (33, 64), dtype=torch.uint8),
        "bf16": bf16,
        "int64": torch.tensor([-(2**63), 2**63 - 1, 0, 12345678901234]),
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "fp16": torch.randn(3, 3).half(),
        "mask": torch.tensor([True, False, True]),
        "transposed": torch.randn(4, 6).t(),  # non-contiguous: saved as a contiguous copy
        "embed": tied,
        "lm_head": tied,  # aliased storage (tied weights): cloned before saving
        "row": tied[3],  # a view into the same storage
        "empty": torch.empty(0, 4),
    }
    progress = TrainingProgress(step=12, tokens_seen=12 * 4096, sampler={"epoch": 0, "offset": 98304},
                                rng={"torch_cpu": [1, 2, 3]}, extra={"best_val": 3.5})
    path = save_checkpoint(tmp_path, 12, tensors, {"progress": progress.state_dict()}, keep_last=3)

    assert path == tmp_path / "checkpoints" / "step-00000012"
    loaded, meta = load_checkpoint(path)
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(_bytes(loaded[name]), _bytes(t)), name
    assert loaded["embed"].untyped_storage().data_ptr() != loaded["lm_head"].untyped_storage().data_ptr()
    assert meta["step"] == 12
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["num_tensors"] == 12
    assert meta["sha256"] == hashlib.sha256((path / "tensors.safetensors").read_bytes()).hexdigest()
    assert TrainingProgress.from_state_dict(meta["progress"]) == progress
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000012\n"
    assert latest_checkpoint(tmp_path) == path


def test_training_progress_rejects_unknown_keys():
    state = TrainingProgress(step=3).state_dict() | {"lr": 0.1}
    with pytest.raises(CheckpointError, match=r"unknown keys \['lr'\] and is missing keys \[\]"):
        TrainingProgress.from_state_dict(state)


def test_reserved_meta_keys_and_keep_last_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"reserved keys \['sha256', 'step'\]"):
        save_checkpoint(tmp_path, 1, _payload(1), {"step": 1, "sha256": "x"}, keep_last=2)
    with pytest.raises(ValueError, match=r"keep_last = 0: must be >= 1"):
        save_checkpoint(tmp_path, 1, _payload(1), {}, keep_last=0)


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _payload(step), {}, keep_last=2)
    assert _listing(tmp_path) == ["latest", "step-00000004", "step-00000005"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000005\n"

    save_checkpoint(tmp_path, 6, _payload(6), {}, keep_last=3)
    assert _listing(tmp_path) == ["latest", "step-00000004", "step-00000005", "step-00000006"]

    # re-saving a step replaces it in place; the others stay
    path = save_checkpoint(tmp_path, 6, _payload(60), {}, keep_last=3)
    assert _listing(tmp_path) == ["latest", "step-00000004", "step-00000005", "step-00000006"]
    tensors, _ = load_checkpoint(path)
    assert tensors["w"][0].item() == 60.0
    assert tensors["step"].item() == 60


def _raise_enospc(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["os.replace", "fsync"])
def test_disk_full_after_tensors_written_keeps_previous(tmp_path, monkeypatch, where):
    save_checkpoint(tmp_path, 1, _payload(1), {}, keep_last=1)
    seen = []
    real_replace, real_fsync = os.replace, os.fsync

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-step-00000002"):
            seen.append(sorted(p.name for p in Path(src).iterdir()))
            _raise_enospc()
        real_replace(src, dst)

    def failing_fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if name.name == "meta.json":
            seen.append(sorted(p.name for p in name.parent.iterdir()))
            _raise_enospc()
        real_fsync(fd)

    if where == "os.replace":
        monkeypatch.setattr(os, "replace", failing_replace)
    else:
        monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 2, _payload(2), {}, keep_last=1)

    assert "tensors.safetensors" in seen[0]  # the failure hit after the tensors file was written
    final = tmp_path / "checkpoints" / "step-00000002"
    assert str(info.value) == (
        f"disk full while saving step 2 to {final}; the previous checkpoint step-00000001 is intact; "
        "free space or lower train.keep_last"
    )
    assert _listing(tmp_path) == ["latest", "step-00000001"]  # no .tmp-* left behind
    tensors, meta = load_checkpoint(tmp_path / "checkpoints" / "step-00000001")
    assert meta["step"] == 1 and tensors["w"][0].item() == 1.0
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000001"


def test_failed_resave_restores_the_old_copy(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, _payload(3), {}, keep_last=2)
    real_replace = os.replace

    def failing_replace(src, dst):
        # the first rename (old copy aside) succeeds, renaming the new copy in fails
        if Path(src).name.startswith(".tmp-step-00000003"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"failed \(\[Errno 5\] Input/output error\); "
                                              r"the previous checkpoint step-00000003 is intact"):
        save_checkpoint(tmp_path, 3, _payload(30), {}, keep_last=2)
    assert _listing(tmp_path) == ["latest", "step-00000003"]
    tensors, _ = load_checkpoint(tmp_path / "checkpoints" / "step-00000003")
    assert tensors["w"][0].item() == 3.0


def test_safetensors_write_error_names_no_previous(tmp_path, monkeypatch):
    def partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", partial_write)
    with pytest.raises(CheckpointError, match=r"disk full while saving step 5 to .*step-00000005; "
                                              r"no earlier checkpoint exists; free space"):
        save_checkpoint(tmp_path, 5, _payload(5), {}, keep_last=2)
    assert _listing(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None


def test_corrupt_newest_is_skipped_with_warning(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _payload(step), {}, keep_last=3)
    newest = tmp_path / "checkpoints" / "step-00000002"
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-7] ^= 0x01  # one bit inside the tensor data
    (newest / "tensors.safetensors").write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"step-00000002 is corrupt: sha256 of tensors.safetensors is"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000002: .*is corrupt"):
        found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step-00000001"
    assert load_checkpoint(found)[0]["w"][0].item() == 1.0

    (found / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001 is incomplete: meta.json is missing"):
        load_checkpoint(found)
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) is None


# Saves a ~50 MB checkpoint (4 x 12.5 MB fp32) every iteration and prints the step once it is saved.
_SAVER = """
import sys, torch
from pathlib import Path
from qtrain.checkpoint.store import save_checkpoint
for step in range(1, 200):
    tensors = {f"w{i}": torch.full((3_125_000,), float(10 * step + i)) for i in range(4)}
    save_checkpoint(Path(sys.argv[1]), step, tensors, {"payload": step}, keep_last=2)
    print(step, flush=True)
"""


def _save_then_kill(run_dir: Path, delay_s: float) -> tuple[int, int]:
    """Start the saver, SIGKILL it delay_s after its first save completed; (return code, steps it reported)."""
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    first = proc.stdout.readline()
    assert first == "1\n", f"saver died before its first save: {first!r}"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    reported = 1 + len(proc.stdout.read().split())
    return proc.wait(), reported


@pytest.mark.slow
def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    # one save takes ~0.25 s here, so delays up to 0.6 s land in every phase (tensors, meta, rename, prune)
    rng = random.Random(20240607)
    delays = [rng.uniform(0.0, 0.6) for _ in range(3)]
    run_dirs = [tmp_path / f"run{i}" for i in range(3)]
    with ThreadPoolExecutor(3) as pool:  # the three kills run concurrently to keep the test short
        results = list(pool.map(_save_then_kill, run_dirs, delays))

    for run_dir, delay, (rc, reported) in zip(run_dirs, delays, results):
        assert rc == -signal.SIGKILL, (delay, rc)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a killed save must never leave a corrupt step-* dir behind
            path = latest_checkpoint(run_dir)
        assert path is not None, delay
        tensors, meta = load_checkpoint(path)
        step = meta["step"]
        # the last step reported saved is on disk, possibly one more that finished right before the kill
        assert reported <= step <= reported + 1, (delay, reported, step)
        assert meta["payload"] == step
        for i in range(4):
            assert torch.equal(tensors[f"w{i}"], torch.full((3_125_000,), float(10 * step + i))), (delay, i)
        steps = [n for n in _listing(run_dir) if n.startswith("step-")]
        assert len(steps) <= 3, steps  # keep_last=2, plus the new one when killed before pruning

        # the next save sweeps whatever the killed one left in .tmp-*
        save_checkpoint(run_dir, step + 1, _payload(step + 1), {}, keep_last=2)
        assert not [n for n in _listing(run_dir) if n.startswith(".tmp-")]
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step-{step + 1:08d}"
