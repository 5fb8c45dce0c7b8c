"""A run you can watch: header, plain log lines, metrics rows, gradient norm, summary, plot; and a run
directory that evaluates, generates and exports with its corpus deleted."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from qtrain.cli.main import main as cli
from qtrain.config.recipe import TrainConfig
from qtrain.data.sources import iter_documents
from qtrain.model.loss import lm_loss
from qtrain.train.build import build

REPO = Path(__file__).resolve().parent.parent
FAST = ["model.vocab_size=512", "train.sample_tokens=0", "train.eval_batches=2", "train.batch_size=4",
        "train.seq_len=64", "model.max_seq_len=64", "train.steps=6", "train.log_every=3", "train.eval_every=6"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("QTRAIN_CACHE")
    os.environ["QTRAIN_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("QTRAIN_CACHE")
    else:
        os.environ["QTRAIN_CACHE"] = old


def test_a_watched_run_then_eval_generate_export_without_its_corpus(cache, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in iter_documents("default", cache, 200_000)))
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli(["train", "--out", str(run), *[f"--set={o}" for o in FAST], "--set", f"data.corpus={corpus}"]) == 0
    out = capsys.readouterr().out  # captured: not a terminal, so plain lines and no progress bar
    assert "\r" not in out
    assert f"qtrain: run directory {run}" in out
    assert re.search(r"qtrain: model: 2 layers, hidden 64, vocab 512: [\d.]+k parameters = [\d.]+k int8 in 14 "
                     r"projections \([\d.]+ MiB with group scales and offsets\) \+ [\d.]+k float", out)
    assert re.search(r"qtrain: data: .*corpus.jsonl: [\d,]+ training tokens, [\d,]+ validation tokens", out)
    assert re.search(r"qtrain: steps: 6 x 256 tokens per step .* = 1,536 tokens = 0\.\d\d epochs", out)
    threads = torch.get_num_threads()
    assert f"qtrain: device: cpu (float32 compute, {threads} CPU thread{'s' * (threads != 1)}: set OMP_NUM_THREADS" in out
    lines = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d)/6 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| "
                       r"[\d.]+ ms/step \| grad norm [\d.e+-]+ \| peak [\d.]+ GiB \(RSS\)$", out, flags=re.M)
    assert lines == ["3", "6"]
    assert re.search(r"^done: 6 steps in [\d.]+ s \([\d.]+ s training, .*\), 1,536 tokens, mean [\d,]+ tokens/s$", out,
                     flags=re.M)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["grad_norm"] > 0 and r["time"] > 1.6e9 for r in steps)
    logged = [r for r in steps if "tok_s" in r]
    assert [r["step"] for r in logged] == [3, 6]
    assert all(r["tok_s"] > 0 and r["step_s"] > 0 and r["peak_mem_gib"] > 0 and r["mem"] == "rss" for r in logged)
    summary = rows[-1]["summary"]
    assert summary["tokens"] == 1536 and summary["train_s"] <= summary["wall_s"] and summary["mean_tok_s"] > 0
    final_val = [r["val_loss"] for r in rows if "val_loss" in r][-1]

    # the plot
    pytest.importorskip("matplotlib")
    assert cli(["plot", str(run)]) == 0
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the corpus gone: eval reads the run's own validation shards; generate and export need the run alone
    corpus.unlink()
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 0
    loss = float(re.search(r"val loss ([\d.]+)", capsys.readouterr().out).group(1))
    assert loss == pytest.approx(final_val, abs=1e-4)
    assert cli(["generate", str(run), "--prompt", "The", "--tokens", "3"]) == 0
    assert cli(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("overrides", [
    [],  # APOLLO-Mini's statistics write the int8 norms; one launch for the fused norm-weight group
    ["optim.float_grad_clip=0.5"],  # the floats' norms measured before their clipping, one by one
    ["optim.embedding_optimizer=same_as_matrices", "optim.lm_head_optimizer=same_as_matrices"],  # method floats
    ["optim.method=apollo", "optim.args.rank=4", "optim.args.scale_type=channel"],  # channel-wise statistics
], ids=["mini", "clip", "method-floats", "channel"])
def test_grad_norm_is_the_global_norm_in_both_modes(overrides):
    cfg = TrainConfig.from_toml(REPO / "recipes" / "tiny.toml", FAST + ["optim.float_optimizer=adamw", *overrides])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (2, 16), generator=gen)
    y = torch.randint(0, 512, (2, 16), generator=gen)
    norms = {}
    for release in (False, True):
        c = cfg.apply_overrides([f"train.release={str(release).lower()}"])
        torch.manual_seed(0)
        built = build(c, "cpu")
        model, updater = built.model, built.updater
        meter = updater.measure_grad_norm()
        if release:
            from qtrain.update.release import attach_release

            attach_release(updater)
        updater.begin_step(1e-3, 1e-3)
        lm_loss(model, x, y, torch.float32).backward()
        if not release:  # the gradients are all still there: the reference norm
            grads = [layer.weight_grad for layer in updater.int8.values()] + [p.grad for p in updater.floats.values()]
            reference = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        updater.finish_step()
        norms[release] = meter.take()
        assert not meter.norms.any()  # reset for the next step
    # fp32 sums of <= 32k squares in another order than the fp64 reference: well inside 1e-5 relative
    torch.testing.assert_close(norms[False].double(), reference, rtol=1e-5, atol=0)
    assert torch.equal(norms[True], norms[False])  # both modes measure the same gradients the same way
