"""qtrain.hf.export: the exported directory loads in a python that never imports qtrain and reproduces our numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from qtrain.errors import ExportError
from qtrain.hf import export
from qtrain.hf.export import export_hf, hf_tokenizer

# Plain text, uppercase included: the tokenizer is trained on lowercased text, so capitals, accents and CJK
# go through byte fallback.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "Return the value of x, or raise a TypeError if x is None.",
    "for i in range(10):\n    print(i ** 2)  # squares",
    "naïve café 東京 — 3.14159   spaced   out",
    "  Leading and trailing whitespace\tand a tab  ",
]
FP32_ATOL = 1e-5  # same weights, fp32 arithmetic on both sides: only kernel summation order can differ


def _train_spm(out: Path, model_type: str) -> Path:
    """A 300-piece sentencepiece model on ~200 KB of the stdlib's pydoc text (qtrain's special ids 0..3)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics.values()).lower()[:200_000]  # lowercase: 75 distinct chars, so 260 + chars fit in 300
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_prefix=str(out / f"tok_{model_type}"), model_type=model_type, vocab_size=300, byte_fallback=True,
        character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    return out / f"tok_{model_type}.model"


def _tiny_llama(tie: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-constant logits; make them informative
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return {t: _train_spm(root, t) for t in ("unigram", "bpe")}


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_hf_tokenizer_ids_equal_sentencepiece(spm_models, model_type):
    from pydoc_data.topics import topics

    sp = spm.SentencePieceProcessor(model_file=str(spm_models[model_type]))
    tok = hf_tokenizer(spm_models[model_type])
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    texts = SENTENCES + list(topics.values())[40:60]  # plus 20 documentation pages in their original case
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text[:40]
        assert tok.encode(text) == ids, text[:40]  # no BOS added: the text as qtrain trains and samples it
        assert tok.decode(ids) == sp.decode(ids), text[:40]


# Runs in a fresh interpreter that refuses to import qtrain: what a user of the exported directory has.
_LOADER = r"""
import json, sys, torch
class _NoQtrain:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "qtrain":
            raise ImportError("the exported directory must load without qtrain")
sys.meta_path.insert(0, _NoQtrain())
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
ids = torch.tensor(job["ids"])
out = {}
for name, path in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # dtype from config.json
    model32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out[name] = {
            "class": type(model).__name__, "tokenizer_class": type(tok).__name__, "dtype": str(model.dtype),
            "logits": model(ids).logits.float(), "logits_fp32": model32(ids).logits,
            "special_ids": [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
            "ids": [tok.encode(s, add_special_tokens=False) for s in job["sentences"]],
            "ids_bos": [tok.encode(s) for s in job["sentences"]],
            "decoded": [tok.decode(tok.encode(s, add_special_tokens=False)) for s in job["sentences"]],
        }
assert not [m for m in sys.modules if m.split(".")[0] == "qtrain"]
out["qtrain_imported"] = "qtrain" in sys.modules
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def exported(spm_models, tmp_path_factory):
    """Three exports loaded by a qtrain-free subprocess: fp32, bf16 and a tied-embedding fp32 model."""
    root = tmp_path_factory.mktemp("export")
    models = {"fp32": _tiny_llama(tie=False, seed=1), "bf16": _tiny_llama(tie=False, seed=2),
              "tied": _tiny_llama(tie=True, seed=3)}
    dirs = {
        "fp32": export_hf(models["fp32"], spm_models["unigram"], root / "fp32"),
        "bf16": export_hf(models["bf16"], spm_models["bpe"], root / "bf16", dtype=torch.bfloat16),
        "tied": export_hf(models["tied"], spm_models["unigram"], root / "tied"),
    }
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    job = root / "job.json"
    job.write_text(json.dumps({"dirs": {k: str(v) for k, v in dirs.items()}, "ids": ids.tolist(),
                               "sentences": SENTENCES}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(job), str(root / "out.pt")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"models": models, "dirs": dirs, "ids": ids, "loaded": torch.load(root / "out.pt")}


@pytest.mark.slow
def test_loaded_without_qtrain(exported):
    assert exported["loaded"]["qtrain_imported"] is False
    for name in ("fp32", "bf16", "tied"):
        assert exported["loaded"][name]["class"] == "LlamaForCausalLM"
        # transformers 5 names PreTrainedTokenizerFast TokenizersBackend: either way tokenizer.json is used as is
        assert exported["loaded"][name]["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")


@pytest.mark.parametrize("name", ["fp32", "tied"])
def test_fp32_export_reproduces_logits(exported, name):
    with torch.no_grad():
        want = exported["models"][name](exported["ids"]).logits
    got = exported["loaded"][name]
    assert got["dtype"] == "torch.float32"
    assert want.abs().max() > 1.0  # informative logits, so the tolerance below is a real check
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=FP32_ATOL)


def test_bf16_export_equals_bf16_rounded_weights(exported):
    model = exported["models"]["bf16"]
    rounded = _tiny_llama(tie=False, seed=2)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the original weights rounded to nearest bf16, held in fp32
        want = rounded(exported["ids"]).logits
        unrounded = model(exported["ids"]).logits
    got = exported["loaded"]["bf16"]
    assert got["dtype"] == "torch.bfloat16"  # config.json dtype makes from_pretrained load bf16
    # loaded as fp32 from bf16 storage: the same numbers as the rounded model, fp32 arithmetic
    torch.testing.assert_close(got["logits_fp32"], want, rtol=0, atol=FP32_ATOL)
    assert (unrounded - want).abs().max() > 10 * FP32_ATOL  # rounding is visible, so the check above has teeth
    # computed in bf16: each of the ~20 rounded ops on a logit's path (2 layers x (norm, q/k/v/o, 3 MLP matmuls,
    # residual adds) + final norm + lm_head) adds at most u = 2^-9 relative error; the linear worst case
    # 20 * u * max|logit| is ~0.13 here (measured: 0.048)
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=20 * 2**-9 * want.abs().max().item())

    # the file itself stores bf16, bit-equal to round-to-nearest of the original fp32 weights
    state = model.state_dict()
    with safe_open(exported["dirs"]["bf16"] / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(state)
        for key in f.keys():
            stored = f.get_tensor(key)
            assert stored.dtype == torch.bfloat16, key
            assert torch.equal(stored, state[key].to(torch.bfloat16)), key


def test_exported_tokenizer_matches_sentencepiece(exported, spm_models):
    for name, model_type in (("fp32", "unigram"), ("bf16", "bpe")):
        sp = spm.SentencePieceProcessor(model_file=str(spm_models[model_type]))
        got = exported["loaded"][name]
        assert got["special_ids"] == [0, 1, 2, 3]
        assert got["ids"] == [sp.encode(s) for s in SENTENCES]
        assert got["ids_bos"] == [sp.encode(s) for s in SENTENCES]  # tok(text) adds no BOS: as qtrain trains
        assert got["decoded"] == [sp.decode(sp.encode(s)) for s in SENTENCES]


def test_export_writes_config_and_leaves_caller_model_alone(exported):
    config = json.loads((exported["dirs"]["bf16"] / "config.json").read_text())
    assert (config["dtype"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        ("bfloat16", 1, 2, 3)
    generation = json.loads((exported["dirs"]["bf16"] / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    tokenizer_config = json.loads((exported["dirs"]["bf16"] / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == 128
    assert sorted(p.name for p in exported["dirs"]["bf16"].iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]
    model = exported["models"]["bf16"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the bf16 cast happened on a copy
    fresh = _tiny_llama(tie=False, seed=2)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert exported["models"]["tied"].lm_head.weight is exported["models"]["tied"].model.embed_tokens.weight


def test_overwrite_and_failure_cleanup(spm_models, tmp_path, monkeypatch):
    model = _tiny_llama(tie=False, seed=4)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(ExportError, match=rf"out_dir {out} exists and is not empty; pass overwrite=True"):
        export_hf(model, spm_models["unigram"], out)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]

    def failing_copy(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        export_hf(model, spm_models["unigram"], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .tmp-hf-* left behind
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the previous export is untouched
    monkeypatch.undo()

    export_hf(model, spm_models["unigram"], out, overwrite=True)
    assert "old.txt" not in {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_rejects_bad_dtype_small_vocab_and_missing_tokenizer(spm_models, tmp_path):
    model = _tiny_llama(tie=False, seed=5)
    with pytest.raises(ExportError, match=r"dtype torch.int8 cannot be exported"):
        export_hf(model, spm_models["unigram"], tmp_path / "a", dtype=torch.int8)
    with pytest.raises(ExportError, match=r"tokenizer model .*nope.model does not exist"):
        export_hf(model, tmp_path / "nope.model", tmp_path / "a")
    small = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=128))
    with pytest.raises(ExportError, match=r"vocab_size 256 is smaller than the tokenizer's 300 pieces"):
        export_hf(small, spm_models["unigram"], tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---- a run that started from a Hugging Face checkpoint ([model] init) ------------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_checkpoint_run_exports_its_architecture_and_tokenizer_files(tmp_path, family):
    """The original architecture (a Qwen2 stays a Qwen2, biases included), the checkpoint's tokenizer files
    copied byte for byte, and the logits of qtrain's dequantized model."""
    from tiny_hf import TOKENIZER_SIZE, make_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtrain.config.recipe import TrainConfig
    from qtrain.model.builder import build_model, dequantized_copy

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, family)
    cfg = TrainConfig.from_dict({"model": {"init": str(ckpt)}, "quant": {"group_size": 64}, "train": {"seq_len": 32}})
    model = build_model(cfg.model, cfg.quant, "cpu").eval()
    out = export_hf(dequantized_copy(model), ckpt, tmp_path / "hf")

    config, original = (json.loads((d / "config.json").read_text()) for d in (out, ckpt))
    assert config["model_type"] == original["model_type"] == family
    assert {k: config.get(k) for k in original if k not in ("dtype", "transformers_version")} == {
        k: v for k, v in original.items() if k not in ("dtype", "transformers_version")}  # no key rewritten
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
    assert not (out / "tokenizer.model").exists()

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    ids = torch.randint(0, TOKENIZER_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(input_ids=ids).logits, rtol=0, atol=FP32_ATOL)
    tok = AutoTokenizer.from_pretrained(out)
    for text in SENTENCES:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
