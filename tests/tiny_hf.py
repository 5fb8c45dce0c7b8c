"""Tiny Hugging Face checkpoints made on the spot (transformers classes, saved locally; no hub access).

`make_checkpoint(dir, family)` writes what `save_pretrained` writes for a real model: config.json,
safetensors (sharded when asked), and a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json +
a ChatML chat template) trained here on Python's own documentation; like Qwen's, the Qwen checkpoints'
tokenizer defines no BOS. `make_smol_checkpoint(dir)` is SmolLM2-135M's shape at tiny width: Llama, tied, GQA
3:1, rope_theta and rms_norm_eps of its own, a 1024-piece tokenizer whose BOS is the chat marker <|im_start|>
and whose EOS is <|im_end|>, added to no text (SmolLM2's settings).
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


@lru_cache(maxsize=2)
def _tokenizer_json(size: int = TOKENIZER_SIZE) -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:60], trainer)
    return tok.to_str()


def make_tokenizer(bos: bool = True, size: int = TOKENIZER_SIZE, bos_token: str = "<s>", eos_token: str = "</s>",
                   add_bos: bool = False) -> PreTrainedTokenizerFast:
    """The tokenizer; bos=False leaves BOS undefined, as Qwen's tokenizers do. add_bos=True puts BOS before every
    text in a post-processor, as Llama 3's tokenizer.json does; else `tok(text)` adds nothing."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(_tokenizer_json(size))
    if add_bos:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                               special_tokens=[(bos_token, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos_token if bos else None,
                                  eos_token=eos_token, pad_token="<pad>")
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


SMOL_SIZE = 1024  # tokenizer pieces = embedding rows, as SmolLM2's 49152
# SmolLM2-135M: hidden 576, 30 layers, 9 query / 3 key-value heads (GQA 3:1), MLP 1536, tied, rope_theta 100000,
# rms_norm_eps 1e-5, 8192 positions; here at width 96 (6 / 2 heads of 16), 2 layers, 256 positions
SMOL_SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=SMOL_SIZE, max_position_embeddings=256, tie_word_embeddings=True,
                  rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=4, eos_token_id=5, pad_token_id=3)


def make_smol_checkpoint(out: Path, seed: int = 0, add_bos: bool = False):
    """A SmolLM2-135M-like checkpoint (see SMOL_SHAPE); add_bos=True gives its tokenizer Llama 3's habit of
    putting BOS before every text instead. Returns the fp32 model."""
    model = tiny_model("llama", seed, **SMOL_SHAPE)
    out = Path(out)
    model.save_pretrained(out)
    make_tokenizer(size=SMOL_SIZE, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos=add_bos).save_pretrained(out)
    return model
