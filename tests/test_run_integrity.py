"""A run directory is the source of truth, and no path gives a wrong model or wrong numbers silently.

Each test here failed on the code before the integrity fixes: tied embeddings, the run's own tokenizer,
fp32 accumulation of int8 gradients, optimizer-state placement on resume, one metric series after a resume,
resume policy, run-directory locking and damaged checkpoints, one hash per resume, export on meta.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quant_cfg, tiny_model_cfg
from safetensors import safe_open

from qtrain.checkpoint import store as ckpt_mod
from qtrain.checkpoint.store import checkpoint_dirs, load_checkpoint
from qtrain.cli.main import main as cli
from qtrain.config.recipe import TrainConfig
from qtrain.data.default_corpus import default_corpus_path
from qtrain.errors import CheckpointError, TrainingError
from qtrain.model.builder import build_model, dequantized_copy
from qtrain.train.build import build
from qtrain.train.run import train
from qtrain.update import step as step_mod

REPO = Path(__file__).resolve().parent.parent
FAST = ["model.vocab_size=512", "train.sample_tokens=0", "train.eval_batches=2", "train.batch_size=4",
        "train.seq_len=64", "model.max_seq_len=64", "train.eval_every=1000", "train.log_every=1"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A user corpus (JSONL) cut from the embedded one: ~300k characters."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["QTRAIN_CACHE"] = str(cache)
    src = default_corpus_path(cache).read_text().splitlines()
    out, chars, lines = tmp_path_factory.mktemp("corpus") / "corpus.jsonl", 0, []
    for line in src:
        lines.append(line)
        chars += len(line)
        if chars > 300_000:
            break
    out.write_text("\n".join(lines) + "\n")
    return out


def cfg(corpus, *overrides):
    return TrainConfig.from_toml(REPO / "recipes" / "tiny.toml", FAST + [f"data.corpus={corpus}", *overrides])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- tied embeddings ------------------------------------------------------------------------------------
def test_tied_embeddings_are_one_tensor_from_init_to_export(corpus_file, tmp_path):
    model = build_model(tiny_model_cfg(tie_embeddings=True), quant_cfg(), "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    run = tmp_path / "run"
    c = cfg(corpus_file, "model.tie_embeddings=true", "train.steps=3", "train.save_every=2",
            "optim.float_optimizer=adamw")
    train(c, run, quiet=True)
    tensors, meta = load_checkpoint(checkpoint_dirs(run)[0])
    assert "model/model.embed_tokens.weight" in tensors and "model/lm_head.weight" not in tensors
    r = build(c, "cpu")
    from qtrain.checkpoint.run_state import load_run
    load_run(checkpoint_dirs(run)[0], tensors, meta, r.model, r.updater, c, torch.device("cpu"))
    assert r.model.lm_head.weight is r.model.model.embed_tokens.weight
    torch.testing.assert_close(r.model.model.embed_tokens.weight, tensors["model/model.embed_tokens.weight"],
                               rtol=0, atol=0)
    assert sum(n.endswith("embed_tokens.weight") or n.startswith("lm_head") for n in r.updater.floats) == 1
    # training moved the one tensor as one: it trained (differs from init) and the head reads the same numbers
    init = build(c, "cpu", updater=False).model.model.embed_tokens.weight
    assert not torch.equal(init, r.model.model.embed_tokens.weight)
    assert cli(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_estimator_counts_a_tied_embedding_once():
    from qtrain.estimate.memory import estimate

    base = TrainConfig.from_toml(REPO / "recipes" / "tiny.toml", ["optim.float_optimizer=adamw"])
    tied = base.apply_overrides(["model.tie_embeddings=true"])
    untied_b, tied_b = estimate(base, "cpu"), estimate(tied, "cpu")
    V, d = base.model.vocab_size, base.model.hidden_size
    # one V x d fp32 weight less, its two AdamW moments and its AdamW's fp32 step scalar
    assert untied_b.persistent_bytes - tied_b.persistent_bytes == 3 * 4 * V * d + 4


# ---- the run directory is authoritative -----------------------------------------------------------------
def test_commands_use_the_runs_own_tokenizer_and_survive_a_deleted_corpus(corpus_file, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(corpus_file.read_bytes())
    run = tmp_path / "run"
    c = cfg(corpus, "train.steps=2")
    train(c, run, quiet=True)
    meta = json.loads((checkpoint_dirs(run)[0] / "meta.json").read_text())
    assert set(meta["data"]) == {"corpus", "tokenizer"} and all(len(v) == 64 for v in meta["data"].values())

    # an edited corpus: eval says so; a resume refuses and names it
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[len(lines) // 3:]) + "\n")
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 0
    assert "changed since this run trained on it" in capsys.readouterr().out
    with pytest.raises(TrainingError, match=r"the corpus \(sha256 .* in the checkpoint, .* now\) changed"):
        train(c.apply_overrides(["train.steps=4"]), run, resume=True, quiet=True)

    # the corpus gone: export and generate read only the run directory
    corpus.unlink()
    assert cli(["generate", str(run), "--prompt", "The", "--tokens", "3"]) == 0
    assert cli(["export", str(run), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()


# ---- gradient accumulation of int8 layers ----------------------------------------------------------------
def test_int8_gradient_accumulates_in_fp32():
    """k micro-batches of B: the int8 layer's summed dW is fp32 (bf16 compute) and equals k x B in one batch
    to fp32 rounding (fp32 compute), like the float tensors' .grad."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), quant_cfg(), "cpu")
    x = torch.randint(0, 64, (4, 16))
    from qtrain.model.loss import lm_loss

    def grads(batches, dtype):
        for layer in [m for m in model.modules() if hasattr(m, "weight_grad")]:
            layer.weight_grad = None
        model.zero_grad(set_to_none=True)
        for xb in batches:
            (lm_loss(model, xb, xb, dtype) / len(batches)).backward()
        layer = model.model.layers[0].mlp.down_proj
        return layer.weight_grad, model.model.embed_tokens.weight.grad

    whole = grads([x], torch.float32)
    parts = grads(list(x.split(1)), torch.float32)
    for w, p in zip(whole, parts):
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-7)
    int8_grad, float_grad = grads(list(x.split(1)), torch.bfloat16)
    assert int8_grad.dtype == torch.float32 and float_grad.dtype == torch.float32

    # the fp32 sum of the per-micro-batch bf16 dW, exactly (not re-rounded to bf16 at each addition)
    singles = [grads([xb], torch.bfloat16)[0].float() for xb in x.split(1)]
    expect = torch.zeros_like(singles[0])
    for s in singles:
        expect += s / 4  # the loss is divided by 4 in each micro-batch, dW scales exactly by a power of two
    torch.testing.assert_close(int8_grad, expect, rtol=0, atol=0)


# ---- resume ------------------------------------------------------------------------------------------------
def test_resumed_float_optimizer_state_is_placed_where_torch_expects_it(corpus_file, tmp_path):
    """AdamW's `step` stays on the CPU (read there every step without a sync); its moments go to the
    parameter's device. The meta device stands in for a GPU: the old code moved every tensor to it."""
    run = tmp_path / "run"
    c = cfg(corpus_file, "train.steps=2", "optim.float_optimizer=adamw")
    train(c, run, quiet=True)
    tensors, meta = load_checkpoint(checkpoint_dirs(run)[0])
    r = build(c, "meta")
    from qtrain.checkpoint.run_state import load_run
    load_run(checkpoint_dirs(run)[0], tensors, meta, r.model, r.updater, c, torch.device("meta"))
    states = [s for opt in r.updater.float_opts.values() for s in opt.state.values()]
    assert states and all(s["step"].device.type == "cpu" for s in states)
    assert all(s["exp_avg"].device.type == "meta" for s in states)
    method = [v for st in r.updater.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert method and all(v.device.type == "meta" for v in method)


def test_resume_logs_each_step_once(corpus_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    c = cfg(corpus_file, "train.steps=10", "train.save_every=4")
    real, calls = step_mod.lm_loss, []

    def dies_at_step_7(model, x, y, dtype):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 7:
                raise KeyboardInterrupt  # a kill after steps 5 and 6 were logged, past the step-4 checkpoint
        return real(model, x, y, dtype)

    monkeypatch.setattr(step_mod, "lm_loss", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(c, run, quiet=True)
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(step_mod, "lm_loss", real)
    train(c, run, resume=True, quiet=True)
    steps = [r["step"] for r in rows(run) if "loss" in r]
    assert steps == list(range(1, 11))
    assert [r["step"] for r in rows(run) if "val_loss" in r] == [0, 10]


def test_resume_policy_kernels_free_method_refused_before_loading(corpus_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg(corpus_file, "train.steps=2"), run, quiet=True)
    recipe_before = (run / "recipe.toml").read_text()
    loaded = []
    monkeypatch.setattr(ckpt_mod, "load_file", lambda *a, **k: loaded.append(a) or pytest.fail("state loaded"))
    with pytest.raises(TrainingError, match=r"\[optim\] method was 'apollo_mini'.*is 'galore' now.*Set optim.method"):
        train(cfg(corpus_file, "train.steps=4", "optim.method=galore"), run, resume=True, quiet=True)
    with pytest.raises(TrainingError, match=r"\[optim\] float_optimizer was"):
        train(cfg(corpus_file, "train.steps=4", "optim.float_optimizer=adam8bit"), run, resume=True, quiet=True)
    assert not loaded and (run / "recipe.toml").read_text() == recipe_before  # refused: recipe untouched
    monkeypatch.undo()
    result = train(cfg(corpus_file, "train.steps=4", "quant.kernels=torch", "quant.matmul=fused"), run,
                   resume=True, quiet=True)
    assert result.step == 4


def test_resume_hashes_the_checkpoint_once(corpus_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg(corpus_file, "train.steps=4", "train.save_every=2"), run, quiet=True)
    hashed = []
    real = ckpt_mod._sha256
    monkeypatch.setattr(ckpt_mod, "_sha256", lambda p: hashed.append(p) or real(p))
    train(cfg(corpus_file, "train.steps=6", "train.save_every=100"), run, resume=True, quiet=True)
    reads = [p for p in hashed if "step-00000004" in str(p)]  # the resumed checkpoint (saves hash their own)
    assert len(reads) == 1, hashed


# ---- run-directory safety --------------------------------------------------------------------------------
def test_a_second_run_on_the_same_directory_is_refused(corpus_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from qtrain.checkpoint.run_dir import RunDir\n"
        f"with RunDir({str(run)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another qtrain process \(pid {holder.pid}\)"):
            train(cfg(corpus_file, "train.steps=2"), run, quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg(corpus_file, "train.steps=2"), run, quiet=True).step == 2  # a killed holder frees it


def test_damaged_checkpoints_are_refused_not_restarted(corpus_file, tmp_path):
    run = tmp_path / "run"
    train(cfg(corpus_file, "train.steps=4", "train.save_every=2"), run, quiet=True)
    recipe_before = (run / "recipe.toml").read_text()
    for path in checkpoint_dirs(run):
        f = path / "tensors.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"(?s)no checkpoint .* can be loaded.*step-00000004.*corrupt"
                                              r".*step-00000002.*corrupt"):
        train(cfg(corpus_file, "train.steps=6"), run, resume=True, quiet=True)
    assert len(checkpoint_dirs(run)) == 2  # nothing pruned
    assert (run / "recipe.toml").read_text() == recipe_before


def test_bad_out_and_stale_scratch(corpus_file, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        train(cfg(corpus_file, "train.steps=1"), f, quiet=True)
    with pytest.raises(TrainingError, match="cannot be used as a run directory"):
        train(cfg(corpus_file, "train.steps=1"), f / "run", quiet=True)
    assert cli(["train", "--quiet", "--out", str(f), "--set", "train.steps=1"]) == 2  # an error, no traceback

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [run / f".tmp-recipe.toml.{dead.stdout.strip()}-0123abcd",
             run / "checkpoints" / f".tmp-step-00000002-{dead.stdout.strip()}"]
    stale[0].write_bytes(b"")
    stale[1].mkdir()
    train(cfg(corpus_file, "train.steps=2"), run, quiet=True)
    assert not any(p.exists() for p in stale)


# ---- export ------------------------------------------------------------------------------------------------
def test_export_copy_is_built_on_meta():
    """dequantized_copy allocates about its output, not a randomly initialised model as well."""
    from qtrain.core.memory_probe import cpu_peak_bytes

    model = build_model(tiny_model_cfg(hidden_size=256, intermediate_size=512, vocab_size=512), quant_cfg(), "cpu")
    out_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(
        m.codes.numel() * 4 for m in model.modules() if hasattr(m, "codes"))
    peak, _ = cpu_peak_bytes(lambda: dequantized_copy(model))
    largest = max(m.codes.numel() * 4 for m in model.modules() if hasattr(m, "codes"))
    assert peak <= out_bytes + 2 * largest, (peak, out_bytes)
