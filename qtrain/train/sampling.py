"""Text samples from a model: top-k sampling with its own generator (the global RNG is left untouched)."""

from __future__ import annotations

import torch

from qtrain.data.tokenizer import document_prefix


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int = 0) -> str:
    """Continue prompt by up to max_new_tokens tokens (top-40, temperature 0.8); stops at EOS.

    tokenizer: a sentencepiece processor (encode, decode, bos_id, eos_id).
    """
    bos = document_prefix(tokenizer)  # the BOS the tokenizer itself adds, if any: as the training data starts
    ids = bos + tokenizer.encode(prompt)
    x = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(input_ids=x[:, -limit:], use_cache=False).logits[0, -1].float()  # (V,)
        top = torch.topk(logits / 0.8, 40)
        nxt = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
        if nxt.item() == tokenizer.eos_id():
            break
        x = torch.cat([x, nxt[None]], dim=1)
    model.train()
    return tokenizer.decode(x[0, len(bos):].tolist())
