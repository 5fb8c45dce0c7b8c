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
from qtrain.optim.base import mix_seed, name_uid, seeded_generator

# Causal SDPA without a mask object. transformers builds the causal mask for "sdpa" itself, and on the
# way checks whether position ids encode packed sequences with `(...).all()`: a host-device sync in every
# forward. qtrain's batches are unpadded and never packed-with-restarts, so attention is plain causal:
# registered under its own name (absent from the mask registry), the mask step returns None at once and
# transformers' own SDPA forward runs with is_causal=True (the fused flash/cuDNN path).
CAUSAL_SDPA = "qtrain_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
ATTENTION = {"sdpa": CAUSAL_SDPA, "eager": "eager"}

# The seven projections the papers train with the method under test and store in int8 (spec §1).
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


@torch.no_grad()
def dequantized_copy(model: LlamaForCausalLM, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A plain float LlamaForCausalLM with the same weights (int8 layers dequantized), for export."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa" if model.config._attn_implementation == CAUSAL_SDPA else "eager"  # plain HF
    plain = LlamaForCausalLM(config).to(dtype)
    state = {k: v for k, v in model.state_dict().items()}
    for name, layer in int8_layers(model).items():
        for key in ("codes", "scale", "offset"):
            state.pop(f"{name}.{key}")
        state[f"{name}.weight"] = layer.dequantize(torch.float32)
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return plain


def enable_activation_checkpointing(model: LlamaForCausalLM) -> None:
    """Recompute each decoder block in backward (non-reentrant): only block inputs stay alive."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

