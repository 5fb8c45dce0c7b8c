"""How a transformers Llama becomes a qtrain model: config from the recipe, int8 linears swapped in.

The model is transformers' own `LlamaForCausalLM` (no re-written architecture, so export is trivial).
It is built on the meta device and materialised tensor by tensor on the target device: a 7B model
never exists in float, each projection is drawn in fp32, quantized to int8 and freed at once.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from qtrain.int8_linear import Int8Linear
from qtrain.seeding import mix_seed, name_uid, seeded_generator

# Causal SDPA without a mask object. transformers builds the causal mask for "sdpa" itself, and on the
# way checks whether position ids encode packed sequences with `(...).all()`: a host-device sync in every
# forward. qtrain's batches are unpadded and never packed-with-restarts, so attention is plain causal:
# registered under its own name (absent from the mask registry), the mask step returns None at once and
# transformers' own SDPA forward runs with is_causal=True (the fused flash/cuDNN path).
CAUSAL_SDPA = "qtrain_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
ATTENTION = {"sdpa": CAUSAL_SDPA, "eager": "eager"}

# The seven projections the papers train with the method under test and store in int8 (docs/algorithms.md §1).
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama_config(model_cfg) -> LlamaConfig:
    """[model] recipe section -> LlamaConfig (no biases, untied unless asked, SiLU MLP)."""
    return LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        initializer_range=model_cfg.init_std,
        rms_norm_eps=model_cfg.rms_norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        attn_implementation=ATTENTION[model_cfg.attn_implementation],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def is_quantized_projection(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS


def build_model(model_cfg, quant_cfg, device: torch.device | str = "cpu", seed: int = 0) -> LlamaForCausalLM:
    """Build the qtrain model: Llama with int8 projections (if quant_cfg.enabled), float everything else.

    Weights are N(0, init_std) (norms 1), each drawn from its own generator seeded by (seed, name):
    the init does not depend on construction order. device="meta" builds shapes only (estimator).
    Float tensors are stored in model_cfg.float_dtype (drawn in fp32, then rounded to nearest).
    """
    config = llama_config(model_cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    meta_dtype = META_DTYPES[quant_cfg.meta_dtype]
    materialize = torch.device(device).type != "meta"

    def init_weight(name: str, shape: torch.Size) -> torch.Tensor:
        gen = seeded_generator(device, mix_seed(seed, name_uid(name)))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * model_cfg.init_std

    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if quant_cfg.enabled and isinstance(child, nn.Linear) and child_name in QUANTIZED_PROJECTIONS:
                q = Int8Linear(child.in_features, child.out_features, quant_cfg.group_size, meta_dtype, device="meta")
                q.kernels = getattr(quant_cfg, "kernels", "auto")
                q.matmul = getattr(quant_cfg, "matmul", "dequantize")
                setattr(module, child_name, q)
    model.to_empty(device=device)  # allocates (uninitialised) int8 codes and float params only
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gave embedding and lm_head a Parameter each: make them one tensor again
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were computed on meta
    if materialize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # RMSNorm weights
                    p.fill_(1.0)
                else:
                    p.copy_(init_weight(name, p.shape))
            for name, layer in int8_layers(model).items():  # one fp32 weight alive at a time
                layer.load_float_(init_weight(f"{name}.weight", (layer.out_features, layer.in_features)))
    param_dtype = META_DTYPES[getattr(model_cfg, "float_dtype", "float32")]
    if param_dtype != torch.float32:
        for p in model.parameters():
            p.data = p.data.to(param_dtype)
    return model


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def float_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Embedding, norms, lm_head (and any projection left unquantized), by qualified name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def tied_aliases(model: nn.Module) -> set[str]:
    """state_dict keys that alias an earlier key's tensor (lm_head.weight when embeddings are tied)."""
    seen, aliases = set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        if t.numel() and t.data_ptr() in seen:
            aliases.add(key)
        seen.add(t.data_ptr())
    return aliases


def plain_config(model: LlamaForCausalLM) -> LlamaConfig:
    """The model's config as plain transformers uses it (qtrain's registered attention name replaced)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa" if model.config._attn_implementation == CAUSAL_SDPA else "eager"
    return config


@torch.no_grad()
def dequantized_copy(model: LlamaForCausalLM, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A plain float LlamaForCausalLM on the CPU with the same weights (int8 layers dequantized), for export.

    Built on meta and filled by assignment: peak memory is one copy in dtype, no random init of a full model.
    """
    config = plain_config(model)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    aliases = tied_aliases(model)
    int8 = int8_layers(model)
    quantized_keys = {f"{name}.{key}" for name in int8 for key in ("codes", "scale", "offset")}
    state = {k: v.detach().to("cpu", dtype, copy=True) for k, v in model.state_dict().items()
             if k not in aliases and k not in quantized_keys and v.is_floating_point()}
    for name, layer in int8.items():
        state[f"{name}.weight"] = layer.dequantize(torch.float32).to("cpu", dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    with torch.device("cpu"):
        plain.model.rotary_emb = LlamaRotaryEmbedding(config)  # computed buffers, not weights
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    assert not missing, f"dequantized_copy left tensors on meta: {missing}"
    return plain.to(dtype)


def enable_activation_checkpointing(model: LlamaForCausalLM) -> None:
    """Recompute each decoder block in backward (non-reentrant): only block inputs stay alive."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

