"""Tiny Hugging Face checkpoints made on the spot (transformers classes, saved locally; no hub access).

`make_checkpoint(dir, family)` writes what `save_pretrained` writes for a real model: config.json,
safetensors (sharded when asked), and a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json +
a ChatML chat template) trained here on Python's own documentation; like Qwen's, the Qwen checkpoints'
tokenizer defines no BOS.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_SIZE = 400  # the tokenizer's pieces; every checkpoint's embedding has at least as many rows
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

FAMILIES = {
    # GQA (4 query heads, 2 kv heads), tied embeddings, an embedding with more rows than the tokenizer
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, vocab_size=416, rope_theta=500000.0)),
    # GQA, untied, a sliding window longer than any test sequence
    "mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False, vocab_size=400, sliding_window=64)),
    # q/k/v biases, tied
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, vocab_size=416, rms_norm_eps=1e-5)),
    # q/k RMSNorms, a head_dim of its own (32, not 64 / 4)
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=False, vocab_size=400, head_dim=32)),
}


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:60], trainer)
    return tok.to_str()


def make_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """The tokenizer; bos=False leaves BOS undefined, as Qwen's tokenizers do."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), unk_token="<unk>",
                                  bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(family: str, seed: int = 0, **over):
    config_cls, model_cls, extra = FAMILIES[family]
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = config_cls(**{**shape, **extra, **over})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-constant logits; make them informative
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
            else:  # norms around 1, not exactly 1: a norm loaded into the wrong place shows
                p.uniform_(0.8, 1.2)
    return model


def make_checkpoint(out: Path, family: str, seed: int = 0, max_shard_size: str | None = None,
                    dtype: torch.dtype = torch.float32, **over):
    """Save a tiny model of `family` (weights in dtype) and the tokenizer to out; returns the fp32 model."""
    model = tiny_model(family, seed, **over)
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out, **kwargs)
    model.float()
    make_tokenizer(bos=not family.startswith("qwen")).save_pretrained(out)
    return model
