"""Data parallel on CPU (gloo, world size 2): one answer whatever the split, replicas checked, faults bounded.

Every run is a real `qtrain train` process (torchrun for 2 ranks) with one thread per process, so the
1-process reference and each rank do the same arithmetic in the same order.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import start_ranks

from qtrain.checkpoint.store import checkpoint_dirs, load_checkpoint, load_latest
from qtrain.data.default_corpus import default_corpus_path

FAST = ["data.max_corpus_chars=300000", "model.vocab_size=512", "train.sample_tokens=0", "train.eval_batches=2",
        "train.batch_size=2", "train.seq_len=64", "model.max_seq_len=64", "train.eval_every=1000",
        "train.log_every=1", "optim.args.update_proj_gap=2", "train.release=false"]
TIMEOUT = 240
TINY = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny.toml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    default_corpus_path(cache)
    return {**os.environ, "QTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def qtrain(env, out: Path, *sets: str, nproc: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    args = ["train", TINY, "--quiet", "--out", str(out), *[f"--set={s}" for s in FAST + list(sets)]]
    args += ["--resume"] if resume else []
    cmd = [sys.executable, "-m", "qtrain", *args] + ([f"--nproc={nproc}"] if nproc > 1 else [])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def final_state(run: Path):
    tensors, meta = load_checkpoint(checkpoint_dirs(run)[0])
    return tensors, meta


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_run(a: Path, b: Path):
    ta, ma = final_state(a)
    tb, mb = final_state(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]  # codes, scales, offsets, float tensors, optimizer states
    assert ma["progress"]["sampler"] == mb["progress"]["sampler"]
    assert ma["progress"]["tokens_seen"] == mb["progress"]["tokens_seen"]
    assert losses(a) == losses(b)


KEEP = ["train.steps=6", "train.save_every=2", "train.keep_last=3"]  # checkpoints at steps 2, 4 and 6


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """The 1-process reference (grad_accum_steps = 2) and the 2-rank run, 6 steps each."""
    root = tmp_path_factory.mktemp("runs")
    qtrain(env, root / "one", *KEEP, "train.grad_accum_steps=2")
    qtrain(env, root / "two", *KEEP, nproc=2)  # log_every = 1: replicas are checked after every step
    return root


@pytest.mark.slow
def test_two_ranks_equal_one_process_accumulating_two_micro_batches(runs):
    """>= 5 steps with projection refreshes every 2: bit for bit, weights, states, data position, losses."""
    assert_same_run(runs / "one", runs / "two")
    assert [s for s, _ in losses(runs / "two")] == list(range(1, 7))
    assert json.loads((runs / "two" / "metrics.jsonl").read_text().splitlines()[1])["tokens"] == 2 * 2 * 64


@pytest.mark.slow
def test_resume_across_world_sizes(env, runs, tmp_path):
    """Each run cut back to its step-4 checkpoint, then continued in the other world size."""
    import shutil

    for run in ("one", "two"):
        shutil.copytree(runs / run, tmp_path / run)
        shutil.rmtree(tmp_path / run / "checkpoints" / "step-00000006")
    qtrain(env, tmp_path / "two", "train.steps=6", "train.grad_accum_steps=2", resume=True)  # 2 ranks -> 1
    qtrain(env, tmp_path / "one", "train.steps=6", nproc=2, resume=True)  # 1 -> 2 ranks
    for run in ("one", "two"):
        assert_same_run(runs / "one", tmp_path / run)


@pytest.mark.slow
def test_release_mode_overlapped_reduction_equals_synchronous(env, tmp_path):
    """Layer-wise release on 2 ranks: all-reduces in flight during backward (dp_overlap = 2) give the same
    bits as reducing and updating each gradient at once (dp_overlap = 0); replicas checked every step."""
    release = ["train.release=true", "train.steps=4"]
    qtrain(env, tmp_path / "sync", *release, "train.dp_overlap=0", nproc=2)
    qtrain(env, tmp_path / "overlap", *release, "train.dp_overlap=2", nproc=2)
    assert_same_run(tmp_path / "sync", tmp_path / "overlap")


def _replica_worker(rank: int, init: str, result) -> None:
    from qtrain.errors import TrainingError
    from qtrain.model.builder import build_model
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import quant_cfg, tiny_model_cfg

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    world = World(rank, 2, rank)
    for mode in ("recipe", "weights"):
        try:
            if mode == "recipe":
                distributed.check_same_recipe(world, f"[train]\nsteps = {100 + rank}\n")
            else:
                model = build_model(tiny_model_cfg(), quant_cfg(), "cpu")
                distributed.check_replicas(model, world, 0)  # identical: same seed, same init
                if rank == 1:
                    with torch.no_grad():
                        model.model.layers[1].mlp.up_proj.codes[3, 5] += 1  # one code, one rank
                distributed.check_replicas(model, world, 7)
            result[(mode, rank)] = "no error"
        except TrainingError as e:
            result[(mode, rank)] = str(e)
    dist.destroy_process_group()


@pytest.mark.slow
def test_divergence_and_recipe_mismatch_fail_on_every_rank(tmp_path):
    result = mp.Manager().dict()
    start_ranks(_replica_worker, (f"file://{tmp_path / 'rendezvous'}", result), 2)
    for rank in (0, 1):
        assert "replicas diverged at step 7: rank 1 holds different model.layers.1.mlp.up_proj.codes" in \
            result[("weights", rank)]
        assert "ranks [1] were started with a recipe" in result[("recipe", rank)]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_a_killed_rank_ends_the_job_and_keeps_the_last_checkpoint(env, tmp_path, fsdp):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "qtrain", "train", TINY, "--quiet", "--out", str(run), "--nproc=2",
           *[f"--set={s}" for s in FAST + ["train.steps=100000", "train.save_every=2", "train.release=true",
                                           f"train.fsdp={str(fsdp).lower()}"]]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while len(checkpoint_dirs(run)) < 1:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        ranks = {}
        for pid in Path("/proc").iterdir():  # the workers are torchrun's children, rank in their environment
            try:
                environ = (pid / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"QTRAIN_CACHE={env['QTRAIN_CACHE']}".encode() in environ and b"RANK=1" in environ:
                ranks[1] = int(pid.name)
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - t0 < 120, out[-3000:]
        # rank 0 reports its failed collective, or torchrun's SIGTERM (sent to every rank once one fails) gets
        # there first: either way a message that names the cause and the way back
        reported = "a collective with the other ranks failed" in out or "stopped by SIGTERM" in out
        assert reported and "relaunch with --resume" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    found = load_latest(run)  # the newest checkpoint is complete and verifies
    assert found is not None and found[2]["progress"]["step"] % 2 == 0


def test_estimate_per_gpu_of_a_data_parallel_job():
    """Replicated weights: one GPU's figure, plus NCCL's buffers outside the allocator, plus (with overlap)
    up to dp_overlap of the largest gradient waiting for their all-reduce."""
    from qtrain.config.recipe import TrainConfig
    from qtrain.estimate.memory import NCCL_BUFFER_BYTES, estimate

    cfg = TrainConfig.from_toml(TINY, ["train.dp_overlap=0"])
    one, two = estimate(cfg, "cuda"), estimate(cfg, "cuda", nproc=2)
    assert two.peak_allocated == one.peak_allocated and two.persistent_bytes == one.persistent_bytes
    assert two.total_on_gpu - one.total_on_gpu == NCCL_BUFFER_BYTES
    overlap = estimate(cfg.apply_overrides(["train.dp_overlap=3"]), "cuda", nproc=2)
    V, d = cfg.model.vocab_size, cfg.model.hidden_size  # the largest gradient: lm_head's, fp32
    assert overlap.peak_allocated - one.peak_allocated == 3 * V * d * 4


def test_sigterm_under_torchrun_is_an_error_that_says_how_to_resume():
    """torchrun stops the other ranks with SIGTERM when one fails: each says so instead of vanishing silently."""
    from qtrain.errors import TrainingError
    from qtrain.parallel.distributed import World, sigterm_as_error

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingError, match=r"rank 1: stopped by SIGTERM .*relaunch with --resume"), \
            sigterm_as_error(World(rank=1, size=2), "relaunch with --resume"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    with sigterm_as_error(World(), "unused"):  # one process: the default handling is left alone
        assert signal.getsignal(signal.SIGTERM) is before
