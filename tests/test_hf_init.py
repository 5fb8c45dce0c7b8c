"""Starting from a Hugging Face checkpoint as a user does: `python -m qtrain` on checkpoints made here.

- a template recipe (finetune-tiny, tiny) takes a checkpoint of any shape: config.json sets the architecture,
  the recipe file's shape keys give way and the header lists them; only a disagreeing --set is refused;
- [model] init's files are checked before anything is built (missing directory, a model.safetensors cut short);
- one BOS/EOS rule, taken from the tokenizer: pretraining documents, fine-tuning examples and sampling prompts
  start as transformers' `tok(text)` does, and the header names the EOS that ends a document;
- a SmolLM2-135M-shaped checkpoint (Llama, tied, GQA 3:1, 1024-piece vocabulary, rope_theta and rms_norm_eps of
  its own) trains, evaluates and exports through the command line; the export's files share one mode.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import SMOL_SHAPE, make_checkpoint, make_smol_checkpoint

from qtrain.cli.main import main as cli

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud tree fire".split()
FAST = ["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.batch_size=2", "train.seq_len=32",
        "train.sample_tokens=4", "train.device=cpu", "train.log_every=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def qtrain(*args: str, cwd: Path, sets: list[str] = ()) -> subprocess.CompletedProcess:
    """`python -m qtrain ARGS --set ...` in cwd, as a user runs it (this checkout's qtrain, one thread)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "QTRAIN_CACHE": str(cwd / "cache")}
    cmd = [sys.executable, "-m", "qtrain", *args, *[x for s in sets for x in ("--set", s)]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def pairs(path: Path, n: int = 24) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        lines.append(json.dumps({"prompt": f"Reverse: {' '.join(w)}\nAnswer:", "completion": " " + " ".join(w[::-1])}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smol") / "smol-hf"
    make_smol_checkpoint(path)
    return path


# ---- #24.2: a template recipe takes the checkpoint's shape -------------------------------------------------------
@pytest.mark.slow
def test_finetune_template_takes_a_checkpoint_of_another_shape(smol, tmp_path):
    """finetune-tiny repeats the tiny shape (hidden 64, vocab 2048, untied, ...): pointed at the SmolLM2-like
    checkpoint it trains that checkpoint's architecture and says which recipe keys gave way. Before: one refusal per
    key ("remove model.hidden_size from the recipe ... or set it to 96")."""
    corpus = pairs(tmp_path / "pairs.jsonl")
    p = qtrain("train", "finetune-tiny", "--out", "run", cwd=tmp_path,
               sets=[f"model.init={smol}", f"data.corpus={corpus}", *FAST])
    assert p.returncode == 0, p.stderr[-3000:]
    header = [line for line in p.stdout.splitlines() if line.startswith("qtrain: init:")]
    assert header == [
        f"qtrain: init: {smol}: its config.json sets the architecture: llama, 2 layers, hidden 96, intermediate 256, "
        f"6 heads (2 key/value, head_dim 16), vocab 1024, max_seq_len 256, rope_theta 100000, rms_norm_eps 1e-05, "
        f"tied embeddings; replaced the recipe's hidden_size = 64 (now 96), intermediate_size = 176 (now 256), "
        f"num_heads = 4 (now 6), num_kv_heads = 0 (now 2), vocab_size = 2048 (now 1024), max_seq_len = 128 "
        f"(now 256), rope_theta = 10000.0 (now 100000.0), rms_norm_eps = 1e-06 (now 1e-05), tie_embeddings = false "
        f"(now true)"]
    written = (tmp_path / "run" / "recipe.toml").read_text()
    assert "hidden_size = 96\n" in written and "tie_embeddings = true\n" in written and "rms_norm_eps = 1e-05\n" in written

    # a shape key the user gives on the command line must agree
    p = qtrain("train", "finetune-tiny", "--out", "run2", cwd=tmp_path,
               sets=[f"model.init={smol}", f"data.corpus={corpus}", "model.hidden_size=64", "model.vocab_size=1024"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[1:] == [
        f"  - --set model.hidden_size=64 but the checkpoint's config.json ({smol}) has 96: leave model.hidden_size "
        f"out (the checkpoint sets it) or set it to 96"]
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow
def test_pretraining_recipe_takes_a_checkpoint_of_another_family(tmp_path):
    """`qtrain train tiny --set model.init=DIR` on a Qwen2 checkpoint: family and shape from config.json."""
    ckpt = tmp_path / "qwen2-hf"
    make_checkpoint(ckpt, "qwen2", vocab_size=400)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Note {i}: the {WORDS[i % 16]} is near the {WORDS[(3 * i) % 16]}." for i in range(400)))
    p = qtrain("train", "tiny", "--out", "run", cwd=tmp_path,
               sets=[f"model.init={ckpt}", f"data.corpus={text}", "data.split_blank_lines=1", *FAST])
    assert p.returncode == 0, p.stderr[-3000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("qtrain: init:")]
    assert "sets the architecture: qwen2, 2 layers, hidden 64, intermediate 128, 4 heads (2 key/value" in line
    assert "replaced the recipe's family = \"llama\" (now \"qwen2\"), intermediate_size = 176 (now 128)" in line


def test_estimate_reads_the_recipe_keys_while_the_checkpoint_is_not_there(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # finetune-tiny's init = "runs/tiny-hf" does not exist here
    assert cli(["estimate", "finetune-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["persistent_bytes"] > 0
    assert cli(["estimate", "finetune-tiny", "--json", "--set", "model.hidden_size=128"]) == 0
    assert json.loads(capsys.readouterr().out)["persistent_bytes"] > out["persistent_bytes"]


# ---- #25: init files checked before anything is built ------------------------------------------------------------
def test_shipped_finetune_recipe_without_its_checkpoint_says_the_two_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "finetune-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'qtrain train: error: [model] init = "runs/tiny-hf": no such directory; point it at a local Hugging Face model '
        "directory (config.json + *.safetensors; a qtrain run makes one: `qtrain train tiny --out runs/tiny && "
        'qtrain export runs/tiny --to runs/tiny-hf`), or set it to "" for a random init')
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.slow  # three short runs of the CLI
def test_shipped_finetune_recipe_runs_after_the_two_commands_its_error_names(tmp_path, monkeypatch, capsys):
    """finetune-tiny as shipped: the two commands of the error above make its checkpoint, then it trains (on the
    embedded text until data.corpus points at the user's pairs) with nothing else to set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTRAIN_CACHE", str(tmp_path / "cache"))
    short = ["--set", "train.steps=4", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0",
             "--set", "data.max_corpus_chars=300000"]
    assert cli(["train", "tiny", "--out", "runs/tiny", "--quiet", *short]) == 0
    assert cli(["export", "runs/tiny", "--to", "runs/tiny-hf"]) == 0
    assert cli(["train", "finetune-tiny", "--out", "runs/tiny-ft", "--quiet", *short]) == 0
    assert "error" not in capsys.readouterr().err
    assert (tmp_path / "runs/tiny-ft/checkpoints/step-00000004").is_dir()


def test_half_a_model_safetensors_is_named_before_anything_is_built(smol, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in smol.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    size = (broken / "model.safetensors").stat().st_size
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "finetune-tiny", "--out", "run", "--set", f"model.init={broken}",
                "--set", f"data.corpus={pairs(tmp_path / 'p.jsonl')}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'qtrain train: error: [model] init = "{broken}": {broken / "model.safetensors"} is '
                          f"{size:,} bytes but its header declares ")
    assert err.strip().endswith("bytes of tensors: the file is incomplete (an interrupted download or copy?); "
                                "download or copy it again")
    assert not (tmp_path / "run").exists()


# ---- #24.5: one BOS/EOS rule, from the tokenizer ---------------------------------------------------------------------
def first_input_ids(monkeypatch, args: list[str], capsys) -> list[int]:
    """The token ids `qtrain generate` feeds the model first (its prompt as encoded)."""
    from qtrain.cli import commands

    seen = []
    real = commands.load_trained

    def load_trained(*a, **k):
        r = real(*a, **k)
        r.model.model.embed_tokens.register_forward_pre_hook(lambda m, inp: seen.append(inp[0][0].tolist()))
        return r

    monkeypatch.setattr(commands, "load_trained", load_trained)
    assert cli(args) == 0
    capsys.readouterr()
    return seen[0]


@pytest.mark.parametrize("add_bos", [False, True], ids=["smollm2-no-bos", "llama3-bos"])
def test_documents_examples_and_prompts_start_as_the_tokenizer_says(add_bos, tmp_path, monkeypatch, capsys):
    """SmolLM2's tokenizer names <|im_start|> its BOS but adds it to no text; Llama 3's adds its BOS to every
    text. Continued pretraining, fine-tuning and sampling follow `tok(text)` in both cases. Before: sampling and
    fine-tuning put <|im_start|> before SmolLM2 prompts, pretraining documents never had Llama 3's BOS."""
    from transformers import AutoTokenizer

    from qtrain.config.recipe import TrainConfig
    from qtrain.data.dataset import open_run_data
    from qtrain.data.finetune import encode_prompt_completion
    from qtrain.data.tokenizer import load_tokenizer, run_tokenizer_path

    ckpt = tmp_path / "hf"
    make_smol_checkpoint(ckpt, add_bos=add_bos)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == add_bos
    docs = [f"The {WORDS[i % 16]} sees the {WORDS[(5 * i) % 16]} and the {WORDS[(7 * i) % 16]}." for i in range(300)]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs))
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    sets = [f"model.init={ckpt}", f"data.corpus={text}", "data.split_blank_lines=1", "data.val_fraction=0.1", *FAST]
    assert cli(["train", "tiny", "--quiet", "--out", str(run), *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    start = "start with '<|im_start|>' (id 4) (the tokenizer's BOS)" if add_bos else \
        "start with no BOS (the tokenizer adds none)"
    assert f"qtrain: tokens: documents, examples and sampling prompts {start}; a document ends with EOS " \
           f"'<|im_end|>' (id 5)" in out.splitlines()

    # pretraining: each document is tok(document) then EOS, so BOS only where the tokenizer adds it
    cfg = TrainConfig.from_toml(run / "recipe.toml")
    stream = open_run_data(run, cfg.data, run_tokenizer_path(run)).train.take(0, 400).tolist()
    segments = []
    while 5 in stream and len(segments) < 5:
        end = stream.index(5)
        segments.append(stream[:end])
        stream = stream[end + 1 :]
    assert len(segments) == 5
    for seg in segments:
        assert (seg[0] == 4) == add_bos, seg
        assert 4 not in seg[1:] and tok.decode(seg[add_bos:]).strip() in docs

    # sampling: the prompt as tok(prompt) encodes it
    prompt = "The river sees"
    assert first_input_ids(monkeypatch, ["generate", str(run), "--prompt", prompt, "--tokens", "1"], capsys) == \
        tok(prompt)["input_ids"]

    # fine-tuning: a prompt/completion example starts with tok(prompt), as the sampling prompt does
    ids, _ = encode_prompt_completion(load_tokenizer(ckpt), "Reverse: a b", " b a")
    assert ids == tok("Reverse: a b")["input_ids"] + tok(" b a", add_special_tokens=False)["input_ids"] + [5]


# ---- #24: a SmolLM2-135M-shaped checkpoint through train, eval, export; #25: the export's files ---------------------
def test_smollm2_shape_trains_evaluates_and_exports(smol, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtrain.cli.commands import load_trained
    from qtrain.model.builder import dequantized_copy

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"The {WORDS[i % 16]} meets the {WORDS[(5 * i) % 16]}." for i in range(300)))
    run, out = tmp_path / "run", tmp_path / "hf"
    monkeypatch.chdir(tmp_path)
    sets = [f"model.init={smol}", f"data.corpus={text}", "data.split_blank_lines=1", *FAST, "train.steps=4",
            "train.eval_every=4"]
    assert cli(["train", "tiny", "--quiet", "--out", str(run), *[x for s in sets for x in ("--set", s)]]) == 0
    capsys.readouterr()
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x][-1]
    assert cli(["eval", str(run)]) == 0
    evaluated = capsys.readouterr().out
    assert f"val loss {final['val_loss']:.4f}" in evaluated  # the same windows as the run's last evaluation

    (out / "old").mkdir(parents=True)
    assert cli(["export", str(run), "--to", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"qtrain export: error: --to {out} exists and is not empty; pass "
                                               f"--overwrite to replace it, or choose a new directory")
    assert cli(["export", str(run), "--to", str(out), "--overwrite"]) == 0
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors was 0600, the rest 0644
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("tie_word_embeddings", "num_key_value_heads", "num_attention_heads", "vocab_size",
                                   "rms_norm_eps", "hidden_size")} == {
        "tie_word_embeddings": True, "num_key_value_heads": 2, "num_attention_heads": 6, "vocab_size": 1024,
        "rms_norm_eps": 1e-5, "hidden_size": 96}
    assert (config.get("rope_parameters") or config)["rope_theta"] == SMOL_SHAPE["rope_theta"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dequantized_copy(load_trained(run, "cpu").model)(x).logits
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=1e-5)


# ---- #19: export holds one float copy of the model --------------------------------------------------------------------
def test_export_holds_one_float_copy(smol, tmp_path):
    """dequantized_copy makes the float model in the export dtype and export_hf saves it as it is: the torch
    allocations of the whole export peak at one copy of the output (plus a piece of one projection in fp32), not
    two (before: export_hf cast a second copy). tools/bench_export.py measures the process RSS on an 8B-shaped model."""
    from qtrain.config.recipe import TrainConfig
    from qtrain.core.memory_probe import cpu_peak_bytes
    from qtrain.hf.export import export_hf
    from qtrain.model.builder import build_model, dequantized_copy

    cfg = TrainConfig.from_dict({"model": {"hidden_size": 256, "intermediate_size": 1024, "num_layers": 2,
                                           "num_heads": 4, "vocab_size": 1024}})
    model = build_model(cfg.model, cfg.quant, "cpu")
    out = tmp_path / "hf"
    peak, _ = cpu_peak_bytes(lambda: export_hf(dequantized_copy(model, torch.bfloat16), smol, out,
                                               dtype=torch.bfloat16))
    output = (out / "model.safetensors").stat().st_size
    piece = 2**18 * 4  # qtrain.hf.pretrained.LOAD_CHUNK_ELEMS fp32 elements: the dequantization transient
    print(f"\nexport: peak {peak:,} bytes allocated, model.safetensors {output:,} bytes")
    assert peak <= output + 2 * piece
