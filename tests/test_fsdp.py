"""FSDP2 on CPU (gloo, world size 2): sharded int8 training equals the one-process run, at half the bytes.

The end-to-end runs are real `qtrain train` processes (torchrun for 2 ranks, one thread each), compared with
the one-process run that accumulates the same two micro-batches (tests/test_distributed.py's reference).
The rest runs 2 ranks with torch.multiprocessing in this file: APOLLO's channel-wise variant, the bytes each
rank keeps, the estimator's figure for them, and the refusals.

Expected equality: bit for bit. The reduce-scatter of two ranks is one fp32 addition per element (the
one-process accumulation's g1 + g2), Adam is elementwise, APOLLO's statistics are computed per column block
with the unsharded chunking and their norms taken of all-gathered tensors, and SR skips to the shard's first
row in the unsharded noise stream (qtrain.parallel.fsdp). Only the logged gradient norm is summed in another order.
"""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import start_ranks
from test_distributed import FAST, TIMEOUT, TINY, assert_same_run, env, final_state, losses, qtrain  # noqa: F401

SMALL = ["train.seq_len=32", "model.max_seq_len=32"]
KEEP = ["train.steps=6", "train.save_every=2", "train.keep_last=3"]  # checkpoints at steps 2, 4 and 6
ONE = ["train.grad_accum_steps=2"]  # release = false (FAST): the same two micro-batches, accumulated
SHARDED = ["train.release=true", "train.fsdp=true"]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):  # noqa: F811
    """The 1-process reference and the 2-rank FSDP2 run, 6 steps each, projections refreshed every 2."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    qtrain(env, root / "one", *SMALL, *KEEP, *ONE)
    qtrain(env, root / "fsdp", *SMALL, *KEEP, *SHARDED, nproc=2)
    return root


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(runs):
    """Codes, scales, offsets, float tensors, APOLLO-Mini and AdamW states, data position and losses after
    2, 4 and 6 steps: bit for bit. The FSDP2 checkpoints are sharded (torch.distributed.checkpoint: one file
    per rank, each holding its half of the tensors), read whole here."""
    from qtrain.checkpoint.store import read_meta

    for step in (2, 4, 6):
        path = runs / "fsdp" / "checkpoints" / f"step-{step:08d}"
        meta = read_meta(path)
        assert meta["layout"] == "dcp" and sorted(meta["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert meta["shard_dims"]["model/model.layers.0.mlp.up_proj.codes"] == 0
        assert meta["shard_dims"]["optim/method_state/model.layers.0.mlp.up_proj/exp_avg"] == 1
        one = (runs / "one" / "checkpoints" / f"step-{step:08d}" / "tensors.safetensors").stat().st_size
        assert all((path / f).stat().st_size < 0.7 * one for f in ("__0_0.distcp", "__1_0.distcp"))
    assert_same_run(runs / "one", runs / "fsdp")
    for step in (2, 4):
        a, b = (final_state_at(runs / r, step) for r in ("one", "fsdp"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in losses(runs / "fsdp")] == list(range(1, 7))


def final_state_at(run: Path, step: int) -> dict:
    from qtrain.checkpoint.store import load_checkpoint

    return load_checkpoint(run / "checkpoints" / f"step-{step:08d}")[0]


@pytest.mark.slow
def test_resume_between_fsdp_and_one_process(env, runs, tmp_path):  # noqa: F811
    """A sharded FSDP2 checkpoint continues in one process and in 2 ranks (each reading its blocks), and a
    one-process checkpoint under FSDP2: all end exactly where the uninterrupted run does, with its losses (the
    checkpoint is world-size free)."""
    for run, copy in (("one", "one"), ("fsdp", "fsdp"), ("fsdp", "fsdp2")):
        shutil.copytree(runs / run, tmp_path / copy)
        shutil.rmtree(tmp_path / copy / "checkpoints" / "step-00000006")
    qtrain(env, tmp_path / "fsdp", *SMALL, "train.steps=6", *ONE, resume=True)  # 2 shards -> 1 process
    qtrain(env, tmp_path / "fsdp2", *SMALL, "train.steps=6", *SHARDED, nproc=2, resume=True)  # 2 -> 2 shards
    qtrain(env, tmp_path / "one", *SMALL, "train.steps=6", *SHARDED, nproc=2, resume=True)  # 1 -> 2 shards
    for run in ("one", "fsdp", "fsdp2"):
        assert_same_run(runs / "one", tmp_path / run)  # losses included


@pytest.mark.slow
def test_two_nodes_equal_one_node(env, runs, tmp_path):  # noqa: F811
    """Two "machines" (two launches on 127.0.0.1, one rank each, c10d rendezvous) train exactly as the
    one-machine 2-rank run: the same checkpoints (sharded, each node writing its blocks) and losses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_nodes"
    args = [sys.executable, "-m", "qtrain", "train", TINY, "--quiet", "--out", str(out),
            *[f"--set={s}" for s in FAST + SMALL + KEEP + SHARDED], "--nnodes=2", f"--master=127.0.0.1:{port}"]
    nodes = [subprocess.Popen([*args, f"--node-rank={r}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    try:
        logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_same_run(runs / "fsdp", out)


# ---- in-process ranks ----------------------------------------------------------------------------------
SETS = ["model.vocab_size=256", "train.seq_len=32", "model.max_seq_len=32", "train.batch_size=2",
        "optim.args.update_proj_gap=2", "train.device=cpu"]
APOLLO = ["optim.method=apollo", "optim.args.rank=4", "optim.args.scale_type=channel", "optim.args.scale=1",
          "optim.args.bias_correction=outside", "optim.args.eps=1e-6"]
STEPS = 3
VARIANTS = {"apollo_mini": SETS, "apollo": SETS + APOLLO, "adam8bit": SETS + ["optim.float_optimizer=adam8bit"],
            "tied": SETS + ["model.tie_embeddings=true"]}  # embedding = lm_head: one tensor, in the root unit


def _batches(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 256, (2, 2, 33), generator=g)
    return [(x[i, :, :-1], x[i, :, 1:]) for i in range(2)]


def _reference(sets: list[str]):
    """One process, release = false, the two micro-batches accumulated: weights, Updater state, bytes."""
    from qtrain.config.recipe import TrainConfig
    from qtrain.model.loss import lm_loss
    from qtrain.parallel.fsdp import persistent_bytes
    from qtrain.train.build import build

    cfg = TrainConfig.from_toml(TINY, sets + ["train.release=false", "train.grad_accum_steps=2"])
    torch.manual_seed(0)
    built = build(cfg, "cpu")
    model, updater = built.model, built.updater
    for k in range(STEPS):
        updater.begin_step(0.01, 0.01)
        for x, y in _batches(k):
            (lm_loss(model, x, y, torch.float32) / 2).backward()
        updater.finish_step()
    return model.state_dict(), updater.state_dict(), persistent_bytes(model, updater)


def _worker(rank: int, init: str, out: str) -> None:
    from qtrain.config.recipe import TrainConfig
    from qtrain.errors import TrainingError
    from qtrain.model.loss import lm_loss
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World
    from qtrain.parallel.fsdp import ShardedTraining
    from qtrain.train.build import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    result = {}
    for label, sets in VARIANTS.items():
        cfg = TrainConfig.from_toml(TINY, sets)
        torch.manual_seed(0)
        sharded = ShardedTraining(build(cfg, "cpu").model, cfg, World(rank, 2, rank, sharded=True), torch.device("cpu"))
        for k in range(STEPS):
            sharded.updater.begin_step(0.01, 0.01)
            x, y = _batches(k)[rank]
            (lm_loss(sharded.model, x, y, torch.float32) / 2).backward()
            sharded.updater.finish_step()
        result[label] = (*sharded.full_state(), sharded.persistent_bytes())
    refused = {}
    for label, bad in (("method", ["optim.method=galore"]), ("grad_clip", ["optim.float_grad_clip=1.0"]),
                       ("float_optimizer", ["optim.float_optimizer=adam8bit", "model.vocab_size=258"])):
        cfg = TrainConfig.from_toml(TINY, SETS + bad)
        try:
            model = build(cfg, "cpu", updater=False).model
            ShardedTraining(model, cfg, World(rank, 2, rank, sharded=True), torch.device("cpu"))
            refused[label] = "accepted"
        except TrainingError as e:
            refused[label] = str(e)
    torch.save((result, refused), f"{out}.{rank}")
    del sharded
    distributed.release_sharded_state()  # FSDP2's state before the process group (see its docstring)
    distributed.shutdown()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start_ranks(_worker, (f"file://{tmp / 'rendezvous'}", str(tmp / "out")), 2)
        refs = {label: _reference(sets) for label, sets in VARIANTS.items()}
    finally:
        torch.set_num_threads(threads)
    return [torch.load(f"{tmp / 'out'}.{r}", weights_only=False) for r in (0, 1)], refs


def _flat(sd: dict) -> dict:
    from qtrain.core.statetree import flatten

    out: dict = {}
    flatten(sd, "optim", out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", list(VARIANTS))
def test_sharded_update_equals_unsharded(spawned, method):
    """APOLLO-Mini (tensor-wise), APOLLO (channel-wise, rank 4: the column blocks of down_proj, 88 of 176
    columns per rank, come through the all-to-all) and 8-bit Adam for the float tensors (its blocks of 256
    lie inside a shard), and tied embeddings (one tensor, the root unit's, updated once from both uses):
    weights and states equal, gathered on both ranks."""
    ranks, refs = spawned
    ref_model, ref_state, _ = refs[method]
    if method == "tied":  # the checkpoint keys: lm_head.weight is the embedding, stored once
        assert ref_model["lm_head.weight"].data_ptr() == ref_model["model.embed_tokens.weight"].data_ptr()
        ref_model = {k: v for k, v in ref_model.items() if k != "lm_head.weight"}
    for rank in (0, 1):
        model_sd, state_sd, _ = ranks[rank][0][method]
        assert model_sd.keys() == ref_model.keys()
        assert not [k for k in ref_model if not torch.equal(ref_model[k], model_sd[k])]
        a, b = _flat(ref_state), _flat(state_sd)
        assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_each_rank_keeps_half_the_persistent_bytes(spawned):
    """Weights (codes, scales, offsets, float tensors) and every optimizer state, counted on the tensors a
    rank holds: half the one-process bytes, but for the replicated RoPE tables and step counters."""
    ranks, refs = spawned
    single = refs["apollo_mini"][2]
    per_rank = [ranks[r][0]["apollo_mini"][2] for r in (0, 1)]
    assert per_rank[0] == per_rank[1]
    assert abs(per_rank[0] / single - 0.5) < 0.01, (per_rank, single)


@pytest.mark.slow
def test_estimator_predicts_the_sharded_bytes(spawned):
    """`qtrain estimate --nproc 2 --fsdp` (CPU): its persistent bytes are what each rank measured."""
    from qtrain.config.recipe import TrainConfig
    from qtrain.estimate.memory import estimate

    ranks, refs = spawned
    cfg = TrainConfig.from_toml(TINY, SETS)
    single, sharded = estimate(cfg, "cpu"), estimate(cfg, "cpu", nproc=2, fsdp=True)
    assert single.persistent_bytes == refs["apollo_mini"][2]
    assert sharded.persistent_bytes == ranks[0][0]["apollo_mini"][2]
    assert sharded.component("FSDP2 gathered").bytes > 0
    assert sharded.peak_allocated < single.peak_allocated + sharded.component("FSDP2 gathered").bytes


@pytest.mark.slow
def test_unsupported_recipes_are_refused_with_the_fix(spawned):
    ranks, _ = spawned
    refused = ranks[0][1]
    assert 'method = "galore": FSDP2 shards APOLLO and APOLLO-Mini only' in refused["method"]
    assert "float_grad_clip > 0" in refused["grad_clip"] and "set it to 0" in refused["grad_clip"]
    assert "model.embed_tokens.weight (258, 64): 8-bit Adam's blocks of 256 would straddle" in refused[
        "float_optimizer"] and 'set optim.float_optimizer = "adamw"' in refused["float_optimizer"]


def test_config_and_shapes_refused_before_training():
    from qtrain.config.recipe import ConfigError, TrainConfig
    from qtrain.config.rules import fsdp_problems

    with pytest.raises(ConfigError, match=r"fsdp = true updates each shard inside backward: it needs release"):
        TrainConfig.from_toml(TINY, ["train.fsdp=true", "train.release=false", "train.grad_accum_steps=2"])
    cfg = TrainConfig.from_toml(TINY, SETS)
    found = fsdp_problems(cfg, 3)
    assert any("out_features must be a multiple of the world size 3" in p for p in found), found


def test_int8_weight_refuses_float_arithmetic():
    """The wrapper only supports what FSDP2 does to a parameter: arithmetic on it is an error, not a silent
    dequantization."""
    from qtrain.parallel.int8_weight import Int8Weight
    from qtrain.quant.groupwise import quantize_groupwise

    w = Int8Weight(*quantize_groupwise(torch.randn(4, 64), 64), 64)
    top, bottom = torch.chunk(w, 2)
    assert top.codes.shape == (2, 64) and bottom.scale.shape == (2,)
    with pytest.raises(NotImplementedError, match="Int8Weight does not support"):
        w + 1


# ---- per-rank materialisation --------------------------------------------------------------------------
# hidden 96 and MLP 192 divide by 2 and 3; the 500-row embedding and lm_head shard unevenly over 3 ranks
WIDE = ["model.hidden_size=96", "model.intermediate_size=192", "model.vocab_size=500", "quant.group_size=32",
        "train.device=cpu"]


def _materialise_worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from qtrain.config.recipe import TrainConfig
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World
    from qtrain.parallel.fsdp import ShardedTraining
    from qtrain.train.build import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = TrainConfig.from_toml(TINY, WIDE)
    meta_model = build(cfg, "meta", updater=False).model
    sharded = ShardedTraining(meta_model, cfg, World(rank, world, rank, sharded=True), torch.device("cpu"))
    blocks = [t.to_local() for t in sharded.sharded_state()[0].values() if isinstance(t, DTensor)]
    local_bytes = sum(t.numel() * t.element_size() for t in blocks)
    weights = sharded.full_state()[0]
    if rank == 0:
        torch.save((weights, local_bytes), out)
    del sharded
    distributed.release_sharded_state()
    distributed.shutdown()


@pytest.mark.slow
def test_random_init_is_the_same_for_1_2_and_3_ranks(tmp_path):
    """Each rank builds on the meta device and draws only its rows: the weights (int8 codes, scales, offsets,
    float tensors) equal the one-process build bit for bit for 2 and 3 ranks, and rank 0 allocates a 1/world
    share of the sharded tensors."""
    from qtrain.config.recipe import TrainConfig
    from qtrain.train.build import build

    cfg = TrainConfig.from_toml(TINY, WIDE)
    torch.manual_seed(0)
    reference = build(cfg, "cpu", updater=False).model.state_dict()
    total = sum(v.numel() * v.element_size() for k, v in reference.items() if "rotary" not in k)
    for world in (2, 3):
        out = tmp_path / f"w{world}"
        start_ranks(_materialise_worker, (world, f"file://{tmp_path / f'rdzv{world}'}", str(out)), world)
        weights, local_bytes = torch.load(out, weights_only=False)
        assert weights.keys() == reference.keys()
        assert not [k for k in reference if not torch.equal(weights[k], reference[k])], world
        assert local_bytes < total / world * 1.05


def _hf_init_worker(rank: int, init: str, ckpt: str, out: str) -> None:
    from qtrain.config.recipe import TrainConfig
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World
    from qtrain.parallel.fsdp import ShardedTraining
    from qtrain.train.build import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    cfg = TrainConfig.from_dict({"model": {"init": ckpt}, "quant": {"group_size": 64},
                                 "optim": {"float_optimizer": "adamw"}, "train": {"seq_len": 32}})
    sharded = ShardedTraining(build(cfg, "meta", updater=False).model, cfg, World(rank, 2, rank, sharded=True),
                              torch.device("cpu"))
    weights = sharded.full_state()[0]
    torch.save((weights, sharded.bytes_read), f"{out}.{rank}")
    del sharded
    distributed.release_sharded_state()
    distributed.shutdown()


@pytest.mark.slow
def test_hf_init_reads_only_each_ranks_rows(tmp_path):
    """[model] init under FSDP2: each rank reads its rows of every tensor from the safetensors files (sliced,
    memory-mapped): half the file's tensor bytes each, and together the weights of the one-process load."""
    from safetensors import safe_open
    from tiny_hf import make_checkpoint

    from qtrain.config.recipe import TrainConfig
    from qtrain.train.build import build

    ckpt = tmp_path / "hf"
    make_checkpoint(ckpt, "llama", vocab_size=256, tie_word_embeddings=False)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())
    start_ranks(_hf_init_worker, (f"file://{tmp_path / 'rdzv'}", str(ckpt), str(tmp_path / "out")), 2)
    cfg = TrainConfig.from_dict({"model": {"init": str(ckpt)}, "quant": {"group_size": 64},
                                 "optim": {"float_optimizer": "adamw"}, "train": {"seq_len": 32}})
    reference = build(cfg, "cpu", updater=False).model.state_dict()
    for rank in (0, 1):
        weights, read = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=False)
        assert weights.keys() == reference.keys()
        assert not [k for k in reference if not torch.equal(weights[k], reference[k])]
        assert read == stored // 2, (read, stored)
