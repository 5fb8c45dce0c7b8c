"""How a transformers Llama (or Mistral, Qwen2, Qwen3) becomes a qtrain model: config, int8 linears swapped in.

The model is transformers' own `LlamaForCausalLM` (or its sibling for the family; no re-written architecture,
so export is trivial). Its config comes from the recipe's [model] keys, or from a Hugging Face checkpoint
with `[model] init` (qtrain.hf.pretrained). It is built on the meta device and materialised tensor by tensor on
the target device: a 7B model never exists in float, each projection is drawn in fp32 (or read from the
checkpoint), quantized to int8 and freed at once.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qtrain.config.recipe import FAMILIES, ConfigError, ModelConfig, QuantConfig
from qtrain.core.seeding import mix_seed, name_uid, seeded_generator
from qtrain.hf.pretrained import checkpoint_config, load_checkpoint_, row_pieces
from qtrain.model.loss import LMHead
from qtrain.model.rms_norm import fuse_rms_norms
from qtrain.quant import dispatch
from qtrain.quant.linear import Int8Linear
from qtrain.quant.stochastic_round import skip_uniforms

# Causal SDPA without a mask object. transformers builds the causal mask for "sdpa" itself, and on the
# way checks whether position ids encode packed sequences with `(...).all()`: a host-device sync in every
# forward. qtrain's batches are never packed-with-restarts (fine-tuning examples are padded on the right,
# which causal attention already hides from every real token), so attention is plain causal:
# registered under its own name (absent from the mask registry), the mask step returns None at once and
# transformers' own SDPA forward runs with is_causal=True (the fused flash/cuDNN path).
CAUSAL_SDPA = "qtrain_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
ATTENTION = {"sdpa": CAUSAL_SDPA, "eager": "eager"}

# The seven projections the papers train with the method under test and store in int8 (docs/algorithms.md §1).
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# [model] family (a checkpoint's model_type) -> transformers config and model classes
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
assert tuple(CLASSES) == FAMILIES


def recipe_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """[model] recipe keys -> the family's config (no biases beyond the family's own, untied unless asked, SiLU MLP)."""
    config_cls = CLASSES[model_cfg.family][0]
    return config_cls(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.kv_heads,
        head_dim=model_cfg.head_dim,
        max_position_embeddings=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        initializer_range=model_cfg.init_std,
        rms_norm_eps=model_cfg.rms_norm_eps,
        tie_word_embeddings=model_cfg.tie_embeddings,
        sliding_window=None,  # plain causal attention (Mistral's default is a 4096 window)
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


llama_config = recipe_config  # the name tools/ use


def model_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The config qtrain builds: the checkpoint's own with [model] init (when its directory is there: the
    estimator may size a recipe before the download), else the recipe's keys; attention as the recipe says."""
    init = model_cfg.init
    if init and (Path(init).expanduser() / "config.json").is_file():
        config = checkpoint_config(init, model_cfg)
    else:
        config = recipe_config(model_cfg)
    config._attn_implementation = ATTENTION[model_cfg.attn_implementation]
    return config


def is_quantized_projection(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS


def build_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, device: torch.device | str = "cpu", seed: int = 0,
                weights: bool = True) -> PreTrainedModel:
    """Build the qtrain model: the family's transformers model with int8 projections (if quant_cfg.enabled).

    With [model] init the weights are the checkpoint's (qtrain.hf.pretrained.load_checkpoint_). Else they are
    N(0, init_std) (norms 1, biases 0), each drawn from its own generator seeded by (seed, name): the init
    does not depend on construction order. device="meta" builds shapes only (estimator). Float tensors are
    stored in model_cfg.float_dtype (drawn in fp32, or read as stored, then rounded to nearest).
    weights=False allocates without initialising: for a model a run checkpoint fills next (resume, eval,
    export), so a [model] init checkpoint is not read for nothing.
    """
    config = model_config(model_cfg)
    with torch.device("meta"):
        model = CLASSES[config.model_type][1](config)
    meta_dtype = META_DTYPES[quant_cfg.meta_dtype]
    materialize = weights and torch.device(device).type != "meta"

    def init_weight(name: str, shape: torch.Size) -> torch.Tensor:
        gen = seeded_generator(device, mix_seed(seed, name_uid(name)))
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * model_cfg.init_std

    if quant_cfg.enabled:
        swap_int8_projections(model, quant_cfg, meta_dtype)
    head = model.lm_head  # the same Linear that can also return the chunked loss (qtrain.model.loss.lm_loss)
    model.lm_head = LMHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    fuse_rms_norms(model, quant_cfg.kernels)  # one Triton kernel per norm on CUDA
    param_dtype = META_DTYPES[model_cfg.float_dtype]
    for p in model.parameters():  # still on meta: free
        p.data = p.data.to(param_dtype)
    model.to_empty(device=device)  # allocates (uninitialised) int8 codes and float params only
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gave embedding and lm_head a Parameter each: make them one tensor again
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were computed on meta
    if materialize and model_cfg.init:
        load_checkpoint_(model, model_cfg.init)  # one checkpoint tensor alive at a time
    elif materialize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # RMSNorm weights 1, biases 0
                    p.fill_(0.0 if name.endswith(".bias") else 1.0)
                else:
                    p.copy_(init_weight(name, p.shape))
            for name, layer in int8_layers(model).items():  # one fp32 weight alive at a time
                layer.load_float_(init_weight(f"{name}.weight", (layer.out_features, layer.in_features)))
    return model


def initial_rows(name: str, shape: tuple[int, ...], r0: int, r1: int, seed: int, std: float) -> torch.Tensor:
    """Rows r0..r1 (fp32, on the CPU) of tensor `name`'s random init N(0, std), bit-equal to those rows of the
    whole tensor as build_model draws it on the CPU: what one rank of a sharded model materialises, the same
    whatever the world size. torch's CPU normal sampler fills blocks of 16 from one 32-bit draw per element, so
    the draws of the whole 16-blocks before r0 are skipped and the 16-blocks around r0..r1 drawn (a tensor whose
    size is not a multiple of 16 is drawn whole: its last block is redrawn at the end)."""
    gen = seeded_generator("cpu", mix_seed(seed, name_uid(name)))
    n, numel = math.prod(shape[1:]), math.prod(shape)
    if numel % 16 or (r0 == 0 and r1 == shape[0]):
        return torch.randn(shape, generator=gen, dtype=torch.float32)[r0:r1] * std
    a, b = r0 * n, r1 * n
    a16, b16 = a - a % 16, -(-b // 16) * 16
    skip_uniforms(gen, a16, "cpu")
    block = torch.randn(b16 - a16, generator=gen, dtype=torch.float32)[a - a16 : b - a16]
    return block.view(r1 - r0, *shape[1:]) * std


def swap_int8_projections(model: nn.Module, quant_cfg: QuantConfig, meta_dtype: torch.dtype) -> None:
    """Replace the seven projections (nn.Linear on meta) by Int8Linear, a bias kept as a float Parameter.

    Raises ConfigError naming every projection whose element count the group size does not divide.
    """
    g = quant_cfg.group_size
    bad = {}
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in QUANTIZED_PROJECTIONS:
                n = child.in_features * child.out_features
                if n % g:
                    bad.setdefault(child_name, (f"{module_name}.{child_name}", child.out_features, child.in_features))
                    continue
                q = Int8Linear(child.in_features, child.out_features, g, meta_dtype, device="meta",
                               bias=child.bias is not None)
                q.kernels, q.matmul = quant_cfg.kernels, quant_cfg.matmul
                setattr(module, child_name, q)
    if bad:
        sizes = [m * n for _, m, n in bad.values()] + [
            l.in_features * l.out_features for l in model.modules() if isinstance(l, Int8Linear)]
        fits = math.gcd(*sizes)
        fit = max(2**k for k in range(g.bit_length()) if fits % 2**k == 0)
        layers = ", ".join(f"{name} ({m} x {n} = {m * n} weights)" for name, m, n in bad.values())
        raise ConfigError([f"[quant] group_size = {g} does not divide {layers}: every quantized projection's "
                           f"weight count must be a multiple of the group size; set quant.group_size = {fit} "
                           f"(the largest power of two <= {g} that divides all seven) or quant.enabled = false"])


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


def plain_config(model: PreTrainedModel) -> PretrainedConfig:
    """The model's config as plain transformers uses it (qtrain's registered attention name replaced)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "sdpa" if model.config._attn_implementation == CAUSAL_SDPA else "eager"
    return config


@torch.no_grad()
def dequantized_copy(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A plain float model of the same class on the CPU with the same weights (int8 layers dequantized), for export.

    Built on meta and filled by assignment: peak memory is one copy in dtype (plus one piece of a projection in
    fp32), no random init of a full model; qtrain.hf.export.export_hf saves it without another copy.
    """
    config = plain_config(model)
    with torch.device("meta"):
        plain = type(model)(config)
    aliases = tied_aliases(model)
    int8 = int8_layers(model)
    quantized_keys = {f"{name}.{key}" for name in int8 for key in ("codes", "scale", "offset")}
    state = {k: v.detach().to("cpu", dtype, copy=True) for k, v in model.state_dict().items()
             if k not in aliases and k not in quantized_keys and v.is_floating_point()}
    for name, layer in int8.items():
        state[f"{name}.weight"] = _dequantized_on_cpu(layer, dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    with torch.device("cpu"):
        plain.model.rotary_emb = type(model.model.rotary_emb)(config)  # computed buffers, not weights
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    assert not missing, f"dequantized_copy left tensors on meta: {missing}"
    return plain.to(dtype)


def _dequantized_on_cpu(layer: Int8Linear, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ (out, in) of layer as a CPU tensor in dtype, dequantized a piece of whole groups at a time: the fp32
    transient is one piece, not the matrix (an 8B model's MLP weight is 235 MB in fp32). Groups are independent,
    so the result equals layer.dequantize(dtype)."""
    m, n, g = layer.out_features, layer.in_features, layer.group_size
    out = torch.empty((m, n), dtype=dtype, device="cpu")
    for r0, r1 in row_pieces(m, n, g // math.gcd(n, g)):  # r0 * n is a multiple of g
        g0, g1 = r0 * n // g, r1 * n // g
        out[r0:r1] = dispatch.dequantize(layer.codes[r0:r1], layer.scale[g0:g1], layer.offset[g0:g1], g, dtype,
                                         layer.kernels)
    return out


def forward_draws_random_numbers(model: nn.Module) -> bool:
    """Whether a training forward consumes the RNG: a dropout with p > 0 (a module, or a `*dropout` probability
    of the config, such as Llama's attention_dropout, passed to the attention function)."""
    config = getattr(model, "config", None)
    probabilities = [v for k, v in (vars(config) if config is not None else {}).items()
                     if "dropout" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    modules = [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    return any(p > 0 for p in probabilities + modules)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder block in backward (non-reentrant): only block inputs stay alive.

    The recompute must see the forward's random numbers, so torch's checkpoint saves the CPU and CUDA RNG
    states by default (torch.cuda.get_rng_state(), which a CUDA-graph capture refuses: [train] cuda_graph would
    crash at capture). A forward without dropout draws no random number (Llama's attention_dropout is 0, its
    MLP has none; SR noise is drawn in the updates from seeded generators, outside the recompute), so the
    states are saved only when the model does have dropout."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": forward_draws_random_numbers(model)}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

