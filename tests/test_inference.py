"""Evaluation and sampling: larger forwards, each projection dequantized once, a KV cache; same numbers as the
plain per-batch evaluation and the full-recompute sampling they replace (written out here as references)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qtrain.cli.main import main as cli
from qtrain.config.recipe import TrainConfig
from qtrain.model.builder import build_model, int8_layers
from qtrain.quant import dispatch
from qtrain.train import evaluation
from qtrain.train.evaluation import evaluate
from qtrain.train.sampling import generate_text

REPO = Path(__file__).resolve().parent.parent
V = 512


def tiny_model(max_seq_len=64, init_std=0.2):
    # init_std 0.2 (not 0.02): peaked, input-dependent logits, so a mixed-up window or token would show
    cfg = TrainConfig.from_toml(REPO / "recipes" / "tiny.toml", [
        f"model.vocab_size={V}", f"model.max_seq_len={max_seq_len}", f"train.seq_len={max_seq_len}",
        f"model.init_std={init_std}"])
    return build_model(cfg.model, cfg.quant, seed=1), cfg


class Windows:
    """val_batches as the datasets give them: fixed (B, T) batches, the last one shorter; y holds -100s
    (fine-tuning padding and prompts) in different numbers per window, so batch means are not window means."""

    def __init__(self, n=11, T=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, V, (n, T), generator=g)
        self.y = torch.randint(0, V, (n, T), generator=g)
        for i in range(n):
            self.y[i, T - 3 * i:] = -100  # window i: 3i padded targets
        self.y[2, :5] = -100

    def val_batches(self, n_batches, batch_size, seq_len):
        for i in range(0, min(n_batches * batch_size, len(self.x)), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


def reference_evaluate(model, data, t):
    """The evaluation before: lm_loss of each train.batch_size batch, averaged (n or legacy n + 1)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in data.val_batches(t.eval_batches, t.batch_size, t.seq_len):
            logits = model(input_ids=x, use_cache=False).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).double().item()
            n += 1
    model.train()
    return total / (n + 1 if t.legacy_eval_divisor else n)


@pytest.mark.parametrize("logit_rows", [0, 4, 1], ids=["one_forward", "4_rows_across_batches", "1_row"])
@pytest.mark.parametrize("legacy", [False, True])
def test_evaluate_equals_the_per_batch_mean(monkeypatch, logit_rows, legacy):
    model, cfg = tiny_model()
    t = cfg.train
    t.batch_size, t.eval_batches, t.seq_len, t.legacy_eval_divisor = 3, 4, 32, legacy  # 11 windows: 3+3+3+2
    if logit_rows:  # forwards of this many windows, cutting across the batches of 3
        monkeypatch.setattr(evaluation, "eval_rows", lambda *args: logit_rows)
    data = Windows()
    expected = reference_evaluate(model, data, t)
    got = evaluate(model, data, t, "cpu", torch.float32)
    # Only the float summation order differs (per-window fp32 sums of <= 32 token losses, then per batch; and a
    # GEMM over more rows may block its reductions differently): fp32 rounding, 2^-24 ~ 6e-8 relative per
    # addition, over at most ~100 additions in a row: < 1e-5 relative. Measured: ~1e-7.
    assert got == pytest.approx(expected, rel=1e-5, abs=0)
    assert model.training  # left in training mode, as before
    assert all(layer.inference_weight is None for layer in int8_layers(model).values())  # released


def test_evaluate_without_free_memory_holds_nothing_and_runs_batch_size_rows(monkeypatch):
    model, cfg = tiny_model()
    t = cfg.train
    t.batch_size, t.eval_batches, t.seq_len = 3, 4, 32
    expected = reference_evaluate(model, Windows(), t)
    calls = []
    real = dispatch.dequantize
    monkeypatch.setattr(dispatch, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(evaluation, "available_memory", lambda device: 0)
    assert evaluate(model, Windows(), t, "cpu", torch.float32) == pytest.approx(expected, rel=1e-5, abs=0)
    assert len(calls) == 4 * len(int8_layers(model))  # 4 forwards of 3, 3, 3, 2 windows, dequantizing as before


class Chars:
    """A stand-in tokenizer: ids are the tokens; decode writes them out; no BOS (the prompt starts as given)."""

    def encode(self, text):
        return [ord(c) % V for c in text]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def bos_id(self):
        return -1

    def eos_id(self):
        return 2


def reference_generate(model, tokenizer, prompt, max_new_tokens, seed):
    """The sampling before: the whole context (its last max_position_embeddings tokens) through the model
    for every new token, no cache."""
    x = torch.tensor([tokenizer.encode(prompt)])
    gen = torch.Generator().manual_seed(seed)
    limit = model.config.max_position_embeddings
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=x[:, -limit:], use_cache=False).logits[0, -1].float()
            top = torch.topk(logits / 0.8, 40)
            nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
            if nxt.item() == tokenizer.eos_id():
                break
            x = torch.cat([x, nxt[None]], dim=1)
    return tokenizer.decode(x[0].tolist())


@pytest.mark.parametrize("max_seq_len", [64, 16], ids=["within_context", "past_the_context"])
def test_kv_cache_sampling_draws_the_tokens_of_full_recompute(max_seq_len):
    model, _ = tiny_model(max_seq_len)
    for seed in range(4):
        expected = reference_generate(model, Chars(), "The", 30, seed)
        assert generate_text(model, Chars(), "The", 30, "cpu", seed=seed) == expected, seed
    assert len(expected.split()) > 20  # the sample did run past the 16-token context (no early EOS)
    assert model.training


def test_sampling_feeds_each_token_once_and_dequantizes_once(monkeypatch):
    model, _ = tiny_model()
    fed, calls = [], []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    real = dispatch.dequantize
    monkeypatch.setattr(dispatch, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = generate_text(model, Chars(), "The", 12, "cpu", seed=0)
    assert len(text.split()) == 3 + 12  # no EOS drawn: 12 forwards
    assert fed == [3] + [1] * 11  # the 3 prompt tokens, then each new token alone (was 3, 4, 5, ...)
    assert len(calls) == len(int8_layers(model))  # 14: once per projection (was 14 per new token)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped monkeypatch is not available
        mp.setenv("QTRAIN_CACHE", str(tmp_path_factory.mktemp("qtrain-cache")))
        run = tmp_path_factory.mktemp("runs") / "tiny"
        flags = ["data.max_corpus_chars=300000", "model.vocab_size=512", "train.sample_tokens=0",
                 "train.eval_batches=3", "train.batch_size=2", "train.seq_len=64", "model.max_seq_len=64",
                 "train.steps=2"]
        assert cli(["train", "--quiet", "--out", str(run), *[f"--set={f}" for f in flags]]) == 0
        yield run


def test_qtrain_eval_and_generate_dequantize_each_projection_once(run_dir, monkeypatch, capsys):
    calls = []
    real = dispatch.dequantize
    monkeypatch.setattr(dispatch, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli(["eval", str(run_dir)]) == 0  # 3 batches of 2 windows: was 3 forwards x 14 dequantizations
    assert "val loss" in capsys.readouterr().out
    assert len(calls) == 14
    calls.clear()
    assert cli(["generate", str(run_dir), "--prompt", "The", "--tokens", "10"]) == 0  # was 14 per token
    assert len(calls) == 14
