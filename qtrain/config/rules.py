"""Which recipe combinations qtrain trains: every rule between keys in one place, checked before anything is built.

A rule is a small function that returns the problems it finds, each naming the key, the value and the fix.
Two groups:
  - recipe rules need the recipe alone: `TrainConfig.from_dict` runs them (`recipe_problems`), so loading a
    recipe (train, prepare, estimate, eval) refuses what can never train;
  - launch rules also need where it runs: the world size (torchrun's processes) and the device type. `qtrain
    train` checks them (`check_launch`) before launching the ranks and again in each rank before the data is
    prepared; `qtrain estimate --nproc N --fsdp` reports them. The components they protect (the captured CUDA
    graph step, FSDP2 sharding) call the same functions when built on their own.

Torch-free like the rest of qtrain.config: the FSDP2 shape rules take the projection shapes from [model]
(the transformers layout qtrain builds; tests/test_rules.py compares them with a built model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qtrain.errors import ConfigError

if TYPE_CHECKING:  # annotations only: qtrain.config.recipe imports this module
    from qtrain.config.recipe import ModelConfig, TrainConfig

Ok = Callable[..., bool]  # ok("train.release", ...): none of these keys was already rejected by its own check

# FSDP2 with bitsandbytes' 8-bit Adam: its block size, and the size below which a tensor keeps 32-bit state
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


# ---- recipe rules: the recipe alone --------------------------------------------------------------------------
def head_shape(cfg: TrainConfig, ok: Ok) -> list[str]:
    m = cfg.model
    if m.head_size:
        if m.head_size % 2 and ok("model.head_size"):
            return [f"[model] head_size = {m.head_size} must be even (RoPE rotates pairs of dimensions)"]
    elif ok("model.hidden_size", "model.num_heads"):
        if m.hidden_size % m.num_heads:
            return [f"[model] num_heads = {m.num_heads} must divide hidden_size = {m.hidden_size}; "
                    f"choose a divisor of {m.hidden_size}"]
        if m.head_dim % 2:
            return [f"[model] head_dim = hidden_size / num_heads = {m.hidden_size} / {m.num_heads} = "
                    f"{m.head_dim} must be even (RoPE rotates pairs of dimensions); change num_heads"]
    return []


def kv_heads_divide_heads(cfg: TrainConfig, ok: Ok) -> list[str]:
    m = cfg.model
    if ok("model.num_heads", "model.num_kv_heads") and m.num_kv_heads and m.num_heads % m.num_kv_heads:
        return [f"[model] num_kv_heads = {m.num_kv_heads} must divide num_heads = {m.num_heads}; "
                f"use a divisor of {m.num_heads}, or 0 for num_kv_heads = num_heads"]
    return []


def seq_len_fits_model(cfg: TrainConfig, ok: Ok) -> list[str]:
    t, m = cfg.train, cfg.model
    if ok("train.seq_len", "model.max_seq_len") and t.seq_len > m.max_seq_len:
        return [f"[train] seq_len = {t.seq_len} exceeds [model] max_seq_len = {m.max_seq_len}; "
                f"lower train.seq_len or raise model.max_seq_len"]
    return []


def release_needs_one_micro_batch(cfg: TrainConfig, ok: Ok) -> list[str]:
    t = cfg.train
    if ok("train.release", "train.grad_accum_steps") and t.release and t.grad_accum_steps > 1:
        return [f"[train] release = true cannot be combined with grad_accum_steps = {t.grad_accum_steps}; "
                f"set grad_accum_steps = 1 or release = false"]
    return []


def cuda_graph_recipe(cfg: TrainConfig, ok: Ok) -> list[str]:
    """What keeps [train] cuda_graph = true from capturing the step: each part of its hot path must read its
    per-step values on the device (qtrain.core.step_state). On a CPU run nothing is captured: the same step runs
    eagerly (the 7B recipes ship cuda_graph = true and still run on a CPU)."""
    t, o, q = cfg.train, cfg.optim, cfg.quant
    if not t.cuda_graph:
        return []
    need = []
    if not t.release:
        need.append("train.release = true (the release hooks are what the graph captures)")
    if t.grad_accum_steps != 1:
        need.append("train.grad_accum_steps = 1 (one backward per step)")
    if o.method not in ("apollo", "apollo_mini"):
        need.append('optim.method = "apollo" or "apollo_mini" (the methods whose update reads the step on the '
                    "device)")
    adam_floats = "adam" in (o.lm_head_optimizer, o.embedding_optimizer)
    if adam_floats and o.float_optimizer != "adam8bit":  # Adam embedding/lm_head: qtrain's capturable 8-bit Adam
        need.append('optim.float_optimizer = "adam8bit" for an Adam lm_head or embedding (qtrain\'s 8-bit Adam '
                    "reads the LR and step on the device; torch's AdamW takes them as host numbers), or "
                    'optim.lm_head_optimizer = optim.embedding_optimizer = "same_as_matrices"')
    if q.kernels == "torch":
        need.append('quant.kernels = "auto" (the torch references seed a generator on the host)')
    if q.rounding != "stochastic":
        need.append('quant.rounding = "stochastic" (nearest rounding is a comparison mode on the host LR)')
    return [f"[train] cuda_graph = true needs {n}" for n in need]


def fsdp_needs_release(cfg: TrainConfig, ok: Ok) -> list[str]:
    t = cfg.train
    if ok("train.fsdp", "train.release") and t.fsdp and not t.release:
        return ["[train] fsdp = true updates each shard inside backward: it needs release = true "
                "(and grad_accum_steps = 1)"]
    return []


def method_named(cfg: TrainConfig, ok: Ok) -> list[str]:
    if ok("optim.method") and not cfg.optim.method.strip():
        return ['[optim] method = "": name an optimizer method, e.g. "apollo" or "apollo_mini"']
    return []


def corpus_named(cfg: TrainConfig, ok: Ok) -> list[str]:
    if ok("data.corpus") and not cfg.data.corpus.strip():
        return ['[data] corpus = "": use "default" for the embedded corpus or give a path']
    return []


def data_sources(cfg: TrainConfig, ok: Ok) -> list[str]:
    return cfg.data.source_problems() if ok("data.sources", "data.corpus") else []


RECIPE_RULES = (head_shape, kv_heads_divide_heads, seq_len_fits_model, release_needs_one_micro_batch,
                cuda_graph_recipe, fsdp_needs_release, method_named, corpus_named, data_sources)


def recipe_problems(cfg: TrainConfig, bad: set[str] = frozenset()) -> list[str]:
    """Every recipe rule's problems; a rule skips keys in `bad` ("section.key" already rejected by its own check)."""
    def ok(*keys: str) -> bool:
        return not bad.intersection(keys)

    return [p for rule in RECIPE_RULES for p in rule(cfg, ok)]


# ---- launch rules: the recipe and where it runs ---------------------------------------------------------------
def cuda_graph_launch(cfg: TrainConfig, world_size: int, device_type: str | None) -> list[str]:
    return cuda_graph_device(device_type, world_size) if cfg.train.cuda_graph else []


def cuda_graph_device(device_type: str | None, world_size: int) -> list[str]:
    """A captured step runs in one process (qtrain.update.step_graph checks it too); off CUDA the same step runs
    eagerly, so any device is accepted."""
    out = []
    if world_size > 1:
        out.append(f"[train] cuda_graph = true runs in one process, not {world_size} (its gradient all-reduces "
                   f"are not captured); set train.cuda_graph = false for data parallel")
    return out


def fsdp_launch(cfg: TrainConfig, world_size: int, device_type: str | None) -> list[str]:
    return fsdp_problems(cfg, world_size) if cfg.train.fsdp and world_size > 1 else []


def fsdp_problems(cfg: TrainConfig, world_size: int) -> list[str]:
    """Why this recipe cannot train under FSDP2 on world_size ranks (empty: it can), each with the fix."""
    t, o = cfg.train, cfg.optim
    out = []
    if o.method not in ("apollo", "apollo_mini"):
        out.append(f'[optim] method = "{o.method}": FSDP2 shards APOLLO and APOLLO-Mini only (their statistics are '
                   f'reduced across shards); use method = "apollo_mini" or "apollo", or drop --fsdp')
    elif o.args.get("official_seed_chain"):
        out.append("[optim.args] official_seed_chain = true is not supported with FSDP2; remove it")
    if not t.release:
        out.append("[train] release = false: FSDP2 updates each shard inside backward (layer-wise release); set "
                   "train.release = true and grad_accum_steps = 1")
    if t.cuda_graph:
        out.append("[train] cuda_graph = true is not supported with FSDP2; set it to false")
    if o.float_grad_clip > 0:
        out.append("[optim] float_grad_clip > 0 clips by a tensor's norm, which a shard does not know; set it to 0")
    if o.lm_head_optimizer != "adam" or o.embedding_optimizer != "adam":
        out.append('[optim] lm_head_optimizer / embedding_optimizer = "same_as_matrices" is not supported with '
                   'FSDP2; set both to "adam"')
    out += fsdp_adam8bit_blocks(cfg, world_size)
    if not cfg.quant.enabled:
        out.append("[quant] enabled = false: FSDP2 here shards int8 projections; set quant.enabled = true")
    out += fsdp_projection_rows(cfg, world_size)
    return out


def fsdp_adam8bit_blocks(cfg: TrainConfig, world_size: int) -> list[str]:
    """bitsandbytes' blockwise state: a shard must hold whole blocks, and stay 8-bit."""
    if cfg.optim.float_optimizer != "adam8bit":
        return []
    for name, (rows, cols) in float_matrix_shapes(cfg.model).items():
        numel = rows * cols
        local = -(-rows // world_size) * cols
        if rows % world_size or local % BNB_BLOCK or (numel >= BNB_MIN_8BIT) != (local >= BNB_MIN_8BIT):
            return [f"{name} {(rows, cols)}: 8-bit Adam's blocks of {BNB_BLOCK} would straddle its {world_size} "
                    f'row shards; set optim.float_optimizer = "adamw"']
    return []


def fsdp_projection_rows(cfg: TrainConfig, world_size: int) -> list[str]:
    """FSDP2 shards an int8 projection by rows, each shard whole groups; APOLLO's column blocks split its columns."""
    if not cfg.quant.enabled:
        return []
    g = cfg.quant.group_size
    for name, (m, n) in projection_shapes(cfg.model).items():
        if m % world_size or (m // world_size * n) % g:
            return [f"{name} ({m} x {n}): FSDP2 shards rows evenly and whole groups of {g}; out_features must be a "
                    f"multiple of the world size {world_size} (and each shard a whole number of groups): use a "
                    f"world size that divides {m}"]
        if m < n and n % world_size:
            return [f"{name} ({m} x {n}): APOLLO's column blocks need in_features divisible by the world size "
                    f"{world_size}"]
    return []


LAUNCH_RULES = (cuda_graph_launch, fsdp_launch)


def launch_problems(cfg: TrainConfig, world_size: int = 1, device_type: str | None = None) -> list[str]:
    """Every launch rule's problems for world_size processes on device_type ("cpu", "cuda"; None: not known)."""
    return [p for rule in LAUNCH_RULES for p in rule(cfg, world_size, device_type)]


def check_launch(cfg: TrainConfig, world_size: int = 1, device_type: str | None = None) -> None:
    """Raise one ConfigError listing every launch problem (the recipe rules ran when cfg was loaded)."""
    found = launch_problems(cfg, world_size, device_type)
    if found:
        where = f"{world_size} processes" if world_size > 1 else "one process"
        raise ConfigError(found, source=f"recipe (run on {device_type or 'this machine'}, {where})")


# ---- the shapes qtrain builds from [model] ------------------------------------------------------------------
def projection_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the first block's seven projections, named as in the transformers model
    (every block has the same shapes, so a rule's first offender is in the first block)."""
    d, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.kv_heads * m.head_dim, m.intermediate_size
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    return {f"{attn}.q_proj": (q, d), f"{attn}.k_proj": (kv, d), f"{attn}.v_proj": (kv, d), f"{attn}.o_proj": (d, q),
            f"{mlp}.gate_proj": (inter, d), f"{mlp}.up_proj": (inter, d), f"{mlp}.down_proj": (d, inter)}


def float_matrix_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """The 2-D float tensors, in parameter order: the embedding, and lm_head unless tied to it."""
    shapes = {"model.embed_tokens.weight": (m.vocab_size, m.hidden_size)}
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, m.hidden_size)
    return shapes
