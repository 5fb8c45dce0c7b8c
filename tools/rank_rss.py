"""Peak host RSS per rank of an FSDP2 start, step and sharded save, for 1, 2 and 4 gloo ranks on the CPU.

    python tools/rank_rss.py                       # per-rank materialisation (meta device), the trainer's path
    python tools/rank_rss.py --whole               # every rank builds the whole model first, then shards it

Each rank: imports (its baseline RSS), builds the model (on the meta device and materialises only its shards,
or whole in host memory and then shards it), runs one training step (which creates the AdamW states), saves a
sharded checkpoint (torch.distributed.checkpoint), and reports its peak RSS (ru_maxrss). The model: 8 blocks,
hidden 1024, MLP 2816, vocabulary 32000 (a 370 MB model: 262 MB of fp32 embedding and lm_head, 110 MB of int8
projections with their group scales), 1.1 GB with its optimizer states.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
MODEL = ["model.hidden_size=1024", "model.intermediate_size=2816", "model.num_layers=8", "model.num_heads=16",
         "model.vocab_size=32000", "quant.group_size=128", "train.device=cpu", "train.seq_len=32",
         "model.max_seq_len=32", "train.batch_size=1", "train.release=true", "train.fsdp=true"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, whole: bool, tmp: str) -> None:
    from qtrain.checkpoint.run_state import save_run
    from qtrain.checkpoint.store import TrainingProgress
    from qtrain.config.recipe import TrainConfig
    from qtrain.model.loss import lm_loss
    from qtrain.parallel import distributed
    from qtrain.parallel.distributed import World
    from qtrain.parallel.fsdp import ShardedTraining, StateView
    from qtrain.train.build import build
    from qtrain.update.release import attach_release

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    baseline = _rss_mib()
    cfg = TrainConfig.from_toml(REPO / "recipes" / "tiny.toml", MODEL)
    if world == 1:  # one process trains unsharded (what --fsdp does alone): the whole model, the one-file save
        built_ = build(cfg, "cpu")
        model, updater = built_.model, built_.updater
        attach_release(updater)
    else:
        model = build(cfg, "cpu" if whole else "meta", updater=False).model
        sharded = ShardedTraining(model, cfg, World(rank, world, rank, sharded=True), torch.device("cpu"))
        model, updater = sharded.model, sharded.updater
    built = _rss_mib()
    x = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(rank))
    updater.begin_step(1e-3, 1e-3)
    (lm_loss(model, x[:, :-1], x[:, 1:], torch.float32) / world).backward()
    updater.finish_step()
    stepped = _rss_mib()
    if world == 1:
        save_run(Path(tmp) / "run", model, updater, TrainingProgress(step=1), cfg, torch.device("cpu"), {})
    else:
        model_sd, updater_sd = sharded.sharded_state()
        save_run(Path(tmp) / "run", StateView(model_sd), StateView(updater_sd), TrainingProgress(step=1), cfg,
                 torch.device("cpu"), {}, sharded=True)
        del sharded, model_sd, updater_sd
    row = torch.tensor([baseline, built, stepped, _rss_mib()], dtype=torch.float64)
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        peak = torch.stack(rows).max(dim=0).values.tolist()  # the largest rank's figures
        mode = "one process" if world == 1 else "whole, then sharded" if whole else "per rank (meta)"
        print(f"| {world} | {mode} | {peak[0]:.0f} | {peak[1]:.0f} "
              f"| {peak[2]:.0f} | {peak[3]:.0f} | {peak[3] - peak[0]:.0f} |", flush=True)
    del model, updater
    distributed.release_sharded_state()
    distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--whole", action="store_true", help="build the whole model on every rank, then shard it")
    p.add_argument("--worlds", default="1,2,4", help="world sizes to run (default 1,2,4)")
    args = p.parse_args()
    print("| ranks | build | RSS after import, MiB | after build | after one step | after the save (peak) "
          "| peak - import |")
    print("|---|---|---|---|---|---|---|")
    for world in map(int, args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, args.whole, tmp), nprocs=world)


if __name__ == "__main__":
    main()
