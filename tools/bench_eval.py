"""Evaluation and sampling time of a qtrain int8 model against plain transformers on the same weights and windows.

One model, random weights of a given Llama shape (default: SmolLM2-135M's: 30 layers, hidden 576, MLP 1536,
9 query / 3 kv heads, vocab 49152, tied embeddings; the time of a forward does not depend on the weights' values),
built by qtrain.model.builder.build_model with int8 projections; the baseline is its dequantized copy
(qtrain.model.builder.dequantized_copy: transformers' LlamaForCausalLM, float32, the same weights). The
validation windows are seeded uniform token ids, grouped in --batch-size rows as a recipe's train.batch_size groups
them. Rows, each run once after a one-forward warm-up of each model, timed with perf_counter (CUDA synchronized):
  eval      qtrain.train.evaluation.evaluate (larger forwards, each projection dequantized once)
  eval (before)    the per-batch evaluation it replaced: lm_loss of each --batch-size batch, every projection
                   dequantized in every forward
  eval (transformers)   the plain model over the same windows in the same forwards as `eval`, under no_grad
  generate  qtrain.train.sampling.generate_text: --tokens new tokens (KV cache, projections dequantized once)
  generate (before)     the whole context through the model for every new token, no cache (the code it replaced)
  generate (transformers)   model.generate(do_sample, top_k 40, temperature 0.8, exactly --tokens new tokens)
The ratio column is each row's time over the transformers row of its kind, measured in the same run.

    python tools/bench_eval.py                                   # SmolLM2-135M shape, 8 windows of 256, 16 tokens
    python tools/bench_eval.py --windows 32 --seq-len 512 --tokens 48 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.device import autocast_dtype, resolve_device
from qtrain.model.builder import build_model, dequantized_copy
from qtrain.model.loss import lm_loss, lm_loss_per_row
from qtrain.train.evaluation import eval_rows, evaluate
from qtrain.train.sampling import generate_text


class Windows:
    """A dataset's val_batches over fixed seeded windows."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=g)

    def val_batches(self, n_batches, batch_size, seq_len):
        for i in range(0, min(n_batches * batch_size, len(self.tokens)), batch_size):
            w = self.tokens[i : i + batch_size]
            yield w[:, :-1], w[:, 1:]


class Ids:
    """A tokenizer stand-in: the prompt is token ids; no BOS, no EOS (every sample runs to --tokens)."""

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def bos_id(self):
        return -1

    def eos_id(self):
        return -1


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def eval_before(model, data, t, device, dtype) -> float:
    total, n = 0.0, 0
    for x, y in data.val_batches(t.eval_batches, t.batch_size, t.seq_len):
        total += lm_loss(model, x.to(device), y.to(device), dtype).double().item()
        n += 1
    return total / n


@torch.no_grad()
def eval_plain(model, data, t, device, dtype) -> float:
    """The transformers model over the same windows, in the forwards of `evaluate`, batch means as it defines."""
    batches = list(data.val_batches(t.eval_batches, t.batch_size, t.seq_len))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    rows = eval_rows(t.batch_size, x.shape[1], model.config.vocab_size, len(x))
    sums = torch.cat([lm_loss_per_row(model, x[i : i + rows].to(device), y[i : i + rows].to(device), dtype)[0]
                      for i in range(0, len(x), rows)])
    return sum(sums[i : i + t.batch_size].sum().item() / y[i : i + t.batch_size].numel()
               for i in range(0, len(x), t.batch_size)) / len(batches)


@torch.no_grad()
def generate_before(model, prompt_ids, tokens, device, seed) -> list[int]:
    x = torch.tensor([prompt_ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    for _ in range(tokens):
        logits = model(input_ids=x[:, -limit:], use_cache=False).logits[0, -1].float()
        top = torch.topk(logits / 0.8, 40)
        x = torch.cat([x, top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)][None]], dim=1)
    return x[0].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per validation window")
    p.add_argument("--windows", type=int, default=8, help="validation windows")
    p.add_argument("--batch-size", type=int, default=1, help="train.batch_size: rows of the per-batch evaluation")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--skip-before", action="store_true", help="leave out the two `before` rows (the slow ones)")
    args = p.parse_args()

    overrides = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                 f"model.intermediate_size={args.intermediate}", f"model.num_heads={args.heads}",
                 f"model.num_kv_heads={args.kv_heads}", f"model.vocab_size={args.vocab}", "model.tie_embeddings=true",
                 f"model.max_seq_len={max(args.seq_len, 2048)}", f"train.seq_len={args.seq_len}",
                 f"train.batch_size={args.batch_size}", f"train.eval_batches={-(-args.windows // args.batch_size)}",
                 f"train.device={args.device}"]
    cfg = TrainConfig.from_toml(find_recipe("tiny"), overrides)
    device = resolve_device(cfg.train.device)
    dtype = autocast_dtype(cfg.train.dtype, device)
    model = build_model(cfg.model, cfg.quant, device)
    plain = dequantized_copy(model).to(device)
    model.eval()
    plain.eval()
    data = Windows(args.windows, args.seq_len, args.vocab)
    prompt = [int(t) for t in torch.randint(0, args.vocab, (4,), generator=torch.Generator().manual_seed(1))]
    threads = f", {torch.get_num_threads()} CPU threads (OMP_NUM_THREADS)" if device.type == "cpu" else ""
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    n_params = sum(p.numel() for p in plain.parameters())
    print(f"settings: device {device}{threads}{load}, torch {torch.__version__}, eval autocast "
          f"{str(dtype).removeprefix('torch.')}, sampling float32")
    print(f"  model: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab}, tied, {n_params / 1e6:.1f}M parameters, int8 group "
          f"{cfg.quant.group_size}, random weights (seed 0)")
    print(f"  eval: {args.windows} windows of {args.seq_len} tokens, batch size {args.batch_size}, "
          f"{eval_rows(args.batch_size, args.seq_len, args.vocab, args.windows)} windows per forward in `eval`; "
          f"generate: 4-token prompt, {args.tokens} new tokens, top-40, temperature 0.8")
    with torch.no_grad():  # warm-up: one short forward each
        for m in (model, plain):
            m(input_ids=torch.tensor([prompt], device=device), use_cache=False)

    rows = []
    s, loss = timed(lambda: evaluate(model, data, cfg.train, device, dtype), device)
    rows.append(("eval", s, f"val loss {loss:.6f}"))
    if not args.skip_before:
        s, before = timed(lambda: eval_before(model, data, cfg.train, device, dtype), device)
        rows.append(("eval (before)", s, f"val loss {before:.6f}"))
    s, base = timed(lambda: eval_plain(plain, data, cfg.train, device, dtype), device)
    rows.append(("eval (transformers)", s, f"val loss {base:.6f}"))
    s, text = timed(lambda: generate_text(model, Ids(), " ".join(map(str, prompt)), args.tokens, device, seed=0),
                    device)
    rows.append(("generate", s, f"{len(text.split()) - len(prompt)} tokens"))
    if not args.skip_before:
        s, ids = timed(lambda: generate_before(model, prompt, args.tokens, device, 0), device)
        same = "same tokens as `generate`" if " ".join(map(str, ids)) == text else "OTHER tokens than `generate`"
        rows.append(("generate (before)", s, same))

    def hf_generate():
        return plain.generate(torch.tensor([prompt], device=device), do_sample=True, top_k=40, temperature=0.8,
                              top_p=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              pad_token_id=0, eos_token_id=None)

    s, out = timed(hf_generate, device)
    rows.append(("generate (transformers)", s, f"{out.shape[1] - len(prompt)} tokens"))
    base_s = {kind: sec for name, sec, _ in rows if name.endswith("(transformers)") for kind in [name.split()[0]]}
    print("| row | seconds | / transformers | check |")
    print("|---|---:|---:|---|")
    for name, sec, note in rows:
        print(f"| {name} | {sec:.2f} | {sec / base_s[name.split()[0]]:.2f} | {note} |")


if __name__ == "__main__":
    main()
