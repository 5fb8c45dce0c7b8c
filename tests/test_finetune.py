"""Fine-tuning records (prompt/completion, chat) and a whole fine-tuning run from a Hugging Face checkpoint.

The run is recipes/finetune-tiny.toml on a tiny Llama made here with the recipe's shape: 20 steps lower the
completion loss, and `qtrain export` writes a directory transformers loads with the same logits as qtrain.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_hf import TOKENIZER_SIZE, make_checkpoint

from qtrain.cli.main import main as cli_main
from qtrain.config.recipe import TrainConfig
from qtrain.data.finetune import IGNORE, FinetuneData, encode_prompt_completion, prepare_run_data
from qtrain.data.tokenizer import load_tokenizer
from qtrain.errors import DataError
from qtrain.model.builder import build_model, dequantized_copy
from qtrain.model.loss import lm_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune-tiny.toml"
# recipes/finetune-tiny.toml repeats the shape of the tiny recipe; the checkpoint is made with that shape
# (and its 2048-row embedding for the 400-piece tokenizer)
TINY_SHAPE = dict(vocab_size=2048, intermediate_size=176, num_key_value_heads=4, tie_word_embeddings=False,
                  rope_theta=10000.0, max_position_embeddings=128, rms_norm_eps=1e-6)
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud tree fire".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "tiny-hf"
    make_checkpoint(path, "llama", **TINY_SHAPE)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reverse_task(n: int, seed: int = 0) -> list[dict]:
    """Prompt: three words; completion: the same words reversed (learnable in a few steps)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.sample(WORDS, 3)
        out.append({"prompt": f"Reverse: {' '.join(w)}\nAnswer:", "completion": " " + " ".join(reversed(w))})
    return out


def recipe(ckpt: Path, corpus: Path, tmp_path: Path, *overrides) -> TrainConfig:
    return TrainConfig.from_toml(RECIPE, [f"model.init={ckpt}", f"data.corpus={corpus}",
                                          f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu", *overrides])


# ---- loss masks ---------------------------------------------------------------------------------------------
def test_prompt_tokens_carry_no_loss(ckpt, tmp_path):
    records = reverse_task(10)
    data = prepare_run_data(recipe(ckpt, write_jsonl(tmp_path / "pc.jsonl", records), tmp_path), tmp_path / "run")
    assert isinstance(data, FinetuneData) and data.kind == "prompt_completion"
    assert (len(data.train), len(data.val)) == (9, 1)  # val_fraction 0.1 of the examples
    tok = data.tokenizer
    x, y = data.train.batch([0, 1], 64, data.pad_id)
    for row, r in enumerate(records[:2]):
        ids, targets = encode_prompt_completion(tok, r["prompt"], r["completion"])
        n_prompt = targets.index(True)
        assert ids[-1] == tok.eos_id() and all(targets[n_prompt:])
        # the tokenizer names <s> its BOS but adds it to no text (tok(text)): neither does the example
        assert ids[:n_prompt] == tok.hf(r["prompt"])["input_ids"] == tok.encode(r["prompt"])
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert (y[row, : n_prompt - 1] == IGNORE).all()  # positions whose next token is a prompt token
        assert y[row, n_prompt - 1 : n].tolist() == ids[n_prompt:]  # the completion and EOS, predicted
        assert (y[row, n:] == IGNORE).all() and (x[row, n:] == data.pad_id).all()  # padding
        assert tok.decode(y[row][y[row] != IGNORE].tolist()) == r["completion"] + tok.hf.eos_token

    # lm_loss averages over the target tokens alone (cross_entropy's ignore_index, mean over non-ignored)
    cfg = recipe(ckpt, tmp_path / "pc.jsonl", tmp_path)
    model = build_model(cfg.model, cfg.quant, "cpu").eval()
    with torch.no_grad():
        logits = model(input_ids=x).logits
        keep = y != IGNORE
        want = F.cross_entropy(logits[keep], y[keep])
        torch.testing.assert_close(lm_loss(model, x, y, torch.float32), want, rtol=1e-6, atol=0)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_chat_loss_on_assistant_turns_only(ckpt, tmp_path):
    convo = [{"role": "system", "content": "You reverse words."},
             {"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "beta alpha"},
             {"role": "user", "content": "river stone tree"}, {"role": "assistant", "content": "tree stone river"}]
    corpus = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}] * 3)
    data = prepare_run_data(recipe(ckpt, corpus, tmp_path, "train.seq_len=96"), None)
    assert data.kind == "chat"
    x, y = data.train.batch([0], 96, data.pad_id)
    targets = y[0][y[0] != IGNORE].tolist()
    # exactly the two answers, each with its end-of-turn marker (the model learns to stop)
    assert data.tokenizer.decode(targets) == "beta alpha<|im_end|>\ntree stone river<|im_end|>\n"
    text = data.tokenizer.decode([t for t in x[0].tolist() if t != data.pad_id])
    assert text.startswith("<|im_start|>system\nYou reverse words.<|im_end|>\n<|im_start|>user\nalpha beta")


def test_sampler_batches_are_a_function_of_seed_and_index(ckpt, tmp_path):
    data = prepare_run_data(recipe(ckpt, write_jsonl(tmp_path / "pc.jsonl", reverse_task(30)), tmp_path), None)
    a, b = data.sampler(4, 64, seed=1), data.sampler(4, 64, seed=1)
    first = [a.next_batch() for _ in range(10)]  # 40 examples: past the end of the 27-example epoch
    b.load_state_dict({**a.state_dict(), "batches_drawn": 5})
    for k in range(5, 10):
        assert all(torch.equal(u, v) for u, v in zip(b.next_batch(), first[k]))
    epoch = [i for k in range(7) for i in a.indices(k)][:27]
    assert sorted(epoch) == list(range(27))  # one epoch visits every training example once


# ---- a fine-tuning run ------------------------------------------------------------------------------------------
def test_finetune_lowers_completion_loss_and_exports(ckpt, tmp_path):
    """recipes/finetune-tiny.toml: 20 steps of int8 APOLLO-Mini with layer-wise release from the checkpoint.
    The validation loss is the completion loss (prompts carry no loss). Then `qtrain export` -> transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtrain.cli.commands import load_trained
    from qtrain.train.run import train

    corpus = write_jsonl(tmp_path / "pairs.jsonl", reverse_task(200))
    cfg = recipe(ckpt, corpus, tmp_path)
    assert (cfg.train.steps, cfg.model.family, cfg.quant.enabled, cfg.train.release) == (20, "llama", True, True)
    result = train(cfg, tmp_path / "run", quiet=True)
    (s0, first), (s1, last) = result.eval_losses[0], result.eval_losses[-1]
    print(f"\ncompletion loss {first:.3f} (step {s0}) -> {last:.3f} (step {s1})")
    assert (s0, s1) == (0, 20) and last < 0.7 * first  # measured: 7.86 -> 4.32

    out = tmp_path / "hf"
    assert cli_main(["export", str(tmp_path / "run"), "--to", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 2048
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied as they are
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    trained = load_trained(tmp_path / "run", "cpu").model
    x = torch.randint(0, TOKENIZER_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dequantized_copy(trained)(x).logits
        torch.testing.assert_close(trained(input_ids=x).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("Reverse: alpha beta gamma\nAnswer: gamma beta alpha", "naïve café — 3.14  spaced\ttab"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert cli_main(["eval", str(tmp_path / "run"), "--device", "cpu"]) == 0  # eval reads the same records


# ---- bad records ---------------------------------------------------------------------------------------------
def test_bad_records_name_the_line_and_the_fix(ckpt, tmp_path):
    def error(records, *overrides) -> str:
        corpus = tmp_path / "bad.jsonl"
        corpus.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
        with pytest.raises(DataError) as e:
            prepare_run_data(recipe(ckpt, corpus, tmp_path, *overrides), None)
        return str(e.value)

    good = reverse_task(3)
    msg = error([good[0], good[1], {"prompt": "only a prompt"}])
    assert msg.startswith(f'{tmp_path / "bad.jsonl"}:3: no string "completion" field (the first record is '
                          f'prompt/completion, so every line needs both); each line must be {{"prompt": "...", '
                          f'"completion": "..."}}')
    assert "bad.jsonl:1: the record has fields ['answer', 'question'] but none of text ([data] text_field)" in error(
        [{"question": "q", "answer": "a"}])
    assert 'bad.jsonl:2: no "messages" list of {"role": ..., "content": ...} objects' in error(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         {"messages": "hi"}])
    assert "bad.jsonl:2: invalid JSON" in error([good[0], "{not json"])
    assert 'the conversation has no "assistant" turn' in error([{"messages": [{"role": "user", "content": "hi"}]}])

    plain = tmp_path / "no-template"  # a base model's tokenizer: no chat template
    shutil.copytree(ckpt, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    convo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert "chat records need a tokenizer with a chat template, and this one has none" in error(
        [convo, convo], f"model.init={plain}")
    long = {"prompt": "word " * 200, "completion": "x"}  # the completion starts beyond seq_len + 1 tokens
    assert "only 1 of 3 examples have answer tokens within train.seq_len + 1 = 65 tokens" in error(
        [long, long, good[0]])


def test_qwen2_chat_finetune_trains_biases_and_exports_a_qwen2(tmp_path):
    """Chat records on a Qwen2 checkpoint (tied, q/k/v biases, a tokenizer without BOS): the biases are trained
    (float optimizer, released in backward), evaluation samples text, and the export is a Qwen2 again."""
    from transformers import AutoModelForCausalLM

    from qtrain.cli.commands import load_trained
    from qtrain.train.run import train

    ckpt = tmp_path / "qwen2"
    ref = make_checkpoint(ckpt, "qwen2")
    rng = random.Random(1)
    convos = [{"messages": [{"role": "user", "content": " ".join(w)},
                            {"role": "assistant", "content": " ".join(reversed(w))}]}
              for w in (rng.sample(WORDS, 3) for _ in range(40))]
    cfg = TrainConfig.from_dict({
        "model": {"init": str(ckpt)}, "quant": {"group_size": 64},
        "optim": {"lr": 0.002, "float_optimizer": "adamw"},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 48, "eval_every": 4, "eval_batches": 1, "save_every": 0,
                  "sample_tokens": 4, "device": "cpu"},
        "data": {"corpus": str(write_jsonl(tmp_path / "chat.jsonl", convos)), "cache_dir": str(tmp_path / "cache")}})
    result = train(cfg, tmp_path / "run", quiet=True)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.eval_losses) and result.sample is not None
    shutil.rmtree(ckpt)  # the run directory alone is enough from here on: architecture, tokenizer, weights
    model = load_trained(tmp_path / "run", "cpu").model
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert not torch.equal(bias, ref.model.layers[0].self_attn.q_proj.bias)  # trained
    assert model.lm_head.weight is model.model.embed_tokens.weight

    out = tmp_path / "hf"
    assert cli_main(["export", str(tmp_path / "run"), "--to", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and loaded.config.model_type == "qwen2"
    x = torch.randint(0, TOKENIZER_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_chat_template_that_rewrites_earlier_turns(ckpt):
    """A Qwen3-like template renders the last answer with a (here empty) reasoning block and earlier answers
    without: the earlier answers are found in the rendered text, each with the EOS token after it."""
    from qtrain.data.finetune import encode_chat

    tok = load_tokenizer(ckpt)
    tok.hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}</s>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    convo = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "beta alpha"},
             {"role": "user", "content": "river stone"}, {"role": "assistant", "content": "stone river"}]
    ids, targets = encode_chat(tok, convo, "test")
    answer = tok.decode([t for t, keep in zip(ids, targets) if keep])
    assert answer == "beta alpha</s><think></think>stone river</s>\n"


def test_separate_validation_file(ckpt, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_task(12, seed=0))
    val_file = write_jsonl(tmp_path / "val.jsonl", reverse_task(5, seed=1))
    data = prepare_run_data(recipe(ckpt, train_file, tmp_path, f"data.validation={val_file}"), None)
    assert (len(data.train), len(data.val)) == (12, 5)  # all of corpus trains, all of validation validates
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match=r'validation = ".*text.jsonl" must be a JSONL file of the same kind'):
        prepare_run_data(recipe(ckpt, train_file, tmp_path, f"data.validation={text}"), None)


def test_prepare_command_on_a_finetune_recipe(ckpt, tmp_path, capsys):
    """`qtrain prepare` with [model] init and records: the checkpoint's tokenizer, the records counted."""
    corpus = write_jsonl(tmp_path / "pairs.jsonl", reverse_task(30))
    assert cli_main(["prepare", str(RECIPE), "--set", f"model.init={ckpt}", "--set", f"data.corpus={corpus}",
                     "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert "prompt_completion records: 27 training and 3 validation examples" in out and str(ckpt) in out


def test_records_are_split_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028, U+0085 or a form feed unescaped: str.splitlines() would cut the record."""
    import gzip

    from qtrain.data.finetune import PROMPT_COMPLETION, read_records

    records = [{"prompt": "line\u2028separator\x0cfeed\u0085next", "completion": " ok"}, {"prompt": "b", "completion": " c"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    plain = tmp_path / "ft.jsonl"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "ft.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert read_records(plain, PROMPT_COMPLETION) == records
    assert read_records(packed, PROMPT_COMPLETION) == records
