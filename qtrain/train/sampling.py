"""Text samples from a model: top-k sampling with its own generator (the global RNG is left untouched)."""

from __future__ import annotations

import inspect

import torch
from tqdm import tqdm
from transformers import DynamicCache

from qtrain.core.device import available_memory
from qtrain.data.tokenizer import document_prefix
from qtrain.train.evaluation import PROGRESS_AFTER_S, inference_weights


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int = 0) -> str:
    """Continue prompt by up to max_new_tokens tokens (top-40, temperature 0.8); stops at EOS.

    tokenizer: a sentencepiece processor (encode, decode, bos_id, eos_id). Computes in the float tensors' dtype.
    A KV cache keeps each step to one token's forward, and the int8 projections are dequantized once for
    the whole sample (inference_weights); the tokens are those of recomputing the full context every step
    (same logits up to float summation order, same generator).
    """
    bos = document_prefix(tokenizer)  # the BOS the tokenizer itself adds, if any: as the training data starts
    ids = bos + tokenizer.encode(prompt)
    x = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    limit = model.config.max_position_embeddings
    cache, fed = DynamicCache(), 0  # keys/values of x[:, :fed]: each new token runs alone through the model
    # transformers 5.25 renamed forward's past_key_values to cache (the old name goes in 5.40); 5.0 knows only it
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    try:
        with inference_weights(model, torch.float32, available_memory(device) // 2), \
                tqdm(total=max_new_tokens, desc="sampling", unit="token", delay=PROGRESS_AFTER_S, leave=False,
                     disable=None) as bar:
            for _ in range(max_new_tokens):  # no autocast, as before
                if x.shape[1] <= limit:
                    out = model(input_ids=x[:, fed:], **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
                    fed = x.shape[1]
                else:  # past the context: the last `limit` tokens from scratch (their positions all shift)
                    out = model(input_ids=x[:, -limit:], use_cache=False)
                logits = out.logits[0, -1].float()  # (V,)
                top = torch.topk(logits / 0.8, 40)
                nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
                bar.update(1)
                if nxt.item() == tokenizer.eos_id():
                    break
                x = torch.cat([x, nxt[None]], dim=1)
    finally:
        model.train()
    return tokenizer.decode(x[0, len(bos):].tolist())
