"""Recipe config: typed dataclasses loaded from TOML and validated in one pass.

`TrainConfig.from_toml("recipes/tiny.toml", ["train.steps=10"])` parses, applies overrides, checks every
key (name, type, range, cross-field constraints) and raises one `ConfigError` listing all problems.
This module must not import torch: checking a recipe is instant. Every key is documented in
docs/recipes.md; the one-line docstring under each field gives its default and effect.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """All problems found in a recipe; `problems` holds one message per problem."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def _bounded(default: Any, **bounds: float) -> Any:
    """A field whose value must satisfy bounds ge/gt/le/lt (checked by `_check_value`)."""
    assert set(bounds) <= {"ge", "gt", "le", "lt"}, bounds
    return field(default=default, metadata={"bounds": bounds})


def _choice(default: str, *allowed: str) -> Any:
    """A string field restricted to `allowed` (the default first)."""
    return field(default=default, metadata={"choices": (default, *allowed)})


# transformers model types qtrain trains (qtrain.model.builder maps each to its *ForCausalLM class)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    """[model]: the architecture (becomes a transformers config), or a Hugging Face checkpoint to start from."""

    init: str = ""
    """"" = random init from the keys below. Else a local Hugging Face model directory (config.json +
    *.safetensors): its config.json sets family and every shape key (a key the recipe sets to another value is
    an error), its weights are loaded tensor by tensor and its tokenizer is the run's (qtrain.hf.pretrained)."""
    family: str = _choice(*FAMILIES)
    """"llama". The transformers model: "llama", "mistral", "qwen2" (q/k/v biases) or "qwen3" (q/k RMSNorm);
    from the checkpoint's model_type with init."""
    hidden_size: int = _bounded(64, ge=1)
    """64. Width d of the residual stream; weight memory grows as d², activations as d."""
    intermediate_size: int = _bounded(176, ge=1)
    """176. Width of the SwiGLU MLP (LLaMA uses ~8/3·d rounded); 3 weights of d × this size per layer."""
    num_layers: int = _bounded(2, ge=1)
    """2. Number of transformer blocks; memory and time per step grow linearly."""
    num_heads: int = _bounded(4, ge=1)
    """4. Query heads; must divide hidden_size, and head_dim = hidden_size / num_heads must be even (RoPE)."""
    num_kv_heads: int = _bounded(0, ge=0)
    """0 = same as num_heads (multi-head attention). Fewer key/value heads (GQA) must divide num_heads."""
    head_size: int = _bounded(0, ge=0)
    """0 = hidden_size / num_heads. The per-head width where a checkpoint sets its own (Qwen3: 128 at any width)."""
    vocab_size: int = _bounded(2048, ge=1)
    """2048. Tokenizer vocabulary; the embedding and lm_head are vocab_size × d float tensors."""
    max_seq_len: int = _bounded(256, ge=1)
    """256. Longest sequence the model accepts (max_position_embeddings); train.seq_len must not exceed it."""
    rope_theta: float = _bounded(10000.0, gt=0)
    """10000.0. RoPE base frequency."""
    init_std: float = _bounded(0.02, gt=0)
    """0.02. Std of the normal init of every linear and the embedding (LLaMA initializer_range)."""
    rms_norm_eps: float = _bounded(1e-6, gt=0)
    """1e-6. Epsilon of the RMSNorm layers."""
    tie_embeddings: bool = False
    """false. Share the embedding matrix with lm_head (saves vocab_size × d parameters)."""
    attn_implementation: str = _choice("sdpa", "eager")
    """"sdpa" (fused, less activation memory) or "eager" (plain matmuls, for debugging)."""
    float_dtype: str = _choice("float32", "bfloat16")
    """"float32". Storage dtype of the float tensors (embedding, norms, lm_head). "bfloat16" halves them and
    applies their updates with stochastic rounding (no fp32 master copy); pair it with optimizers whose state
    is small (embedding_optimizer / lm_head_optimizer = "same_as_matrices") for the leanest 7B."""

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used: num_kv_heads, or num_heads when it is 0."""
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        """Per-head width: head_size, or hidden_size / num_heads when it is 0."""
        return self.head_size or self.hidden_size // self.num_heads


@dataclass
class QuantConfig:
    """[quant]: group-wise int8 storage of the linear weights, updated with stochastic rounding."""

    enabled: bool = True
    """true. Store every transformer linear as uint8 codes + per-group scale/offset (~1 byte per weight)."""
    group_size: int = _bounded(128, ge=1)
    """128. Consecutive weights sharing one scale and offset; each weight's element count must be a multiple."""
    meta_dtype: str = _choice("float32", "bfloat16")
    """"float32" or "bfloat16": dtype of the per-group scale and offset (2 × 4 or 2 × 2 bytes per group)."""
    rounding: str = _choice("stochastic", "nearest")
    """"stochastic" (unbiased: small updates survive in expectation) or "nearest" (updates < half a step are lost)."""
    kernels: str = _choice("auto", "torch", "triton")
    """"auto". Kernels for int8 dequantize and update: "auto" = fused Triton kernels on CUDA (when triton is
    installed and the group size is a power of two), the plain-torch reference
    otherwise; "torch" forces the reference; "triton" forces the kernels (error where they cannot run)."""
    matmul: str = _choice("dequantize", "fused")
    """"dequantize". How int8 projections multiply: "dequantize" writes Ŵ in the compute dtype, then a cuBLAS GEMM;
    "fused" = one Triton kernel that dequantizes weight tiles inside the GEMM (forward and input gradient), used
    where the Triton kernels run (see kernels). tools/bench_matmul.py measures which is faster on your GPU."""


@dataclass
class OptimConfig:
    """[optim]: the matrix optimizer (APOLLO family), the float-tensor optimizer and the LR schedule."""

    method: str = "apollo_mini"
    """"apollo_mini". Optimizer for the 2-D transformer weights; names are checked by qtrain.optim.registry."""
    args: dict[str, Any] = field(default_factory=dict)
    """{} ([optim.args] table). Method hyperparameters (rank, scale, scale_type, ...), passed through untouched."""
    lr: float = _bounded(0.01, gt=0)
    """0.01. Peak learning rate of the matrix optimizer."""
    warmup_frac: float = _bounded(0.1, ge=0, lt=1)
    """0.1. Fraction of train.steps spent in linear warmup from 0 to lr."""
    min_lr_ratio: float = _bounded(0.1, ge=0, le=1)
    """0.1. Cosine decay ends at min_lr_ratio × lr at the last step."""
    weight_decay: float = _bounded(0.0, ge=0)
    """0.0. Decoupled weight decay for the matrix weights."""
    float_optimizer: str = _choice("adam8bit", "adamw")
    """"adam8bit" (bitsandbytes, 2 bytes of state per parameter, CUDA only) or "adamw" (torch, 8 bytes)."""
    float_lr: float = _bounded(0.0, ge=0)
    """0.0 = same as lr. Peak LR of the float tensors (embedding, norms, lm_head); follows the same schedule."""
    float_betas: tuple[float, float] = (0.9, 0.999)
    """[0.9, 0.999]. Adam betas of the float optimizer, each in [0, 1)."""
    float_eps: float = _bounded(1e-8, gt=0)
    """1e-8. Adam epsilon of the float optimizer."""
    float_grad_clip: float = _bounded(0.0, ge=0)
    """0.0 = off. Per-tensor gradient-norm clip for the float tensors, which have no norm-growth limiter."""
    lm_head_optimizer: str = _choice("adam", "same_as_matrices")
    """"adam" (lm_head with the float optimizer, as the papers do) or "same_as_matrices" (the matrix method, weight stays float)."""
    embedding_optimizer: str = _choice("adam", "same_as_matrices")
    """"adam" (float optimizer, as the papers) or "same_as_matrices" (the matrix method: APOLLO-Mini keeps 2 x vocab floats)."""

    @property
    def float_lr_value(self) -> float:
        """Peak LR of the float tensors: float_lr, or lr when float_lr is 0."""
        return self.float_lr or self.lr


@dataclass
class LoopConfig:
    """[train]: the training loop: steps, batch shape, memory switches, evaluation and checkpoints."""

    steps: int = _bounded(200, ge=1)
    """200. Optimizer steps; the LR schedule spans exactly this many."""
    batch_size: int = _bounded(8, ge=1)
    """8. Sequences per micro-batch; activation memory grows linearly."""
    seq_len: int = _bounded(128, ge=1)
    """128. Tokens per training sequence; at most model.max_seq_len."""
    grad_accum_steps: int = _bounded(1, ge=1)
    """1. Micro-batches per optimizer step (tokens per step = batch_size × seq_len × this); needs release = false."""
    release: bool = True
    """true. Layer-wise gradient release: step each weight inside backward and free its gradient at once."""
    activation_checkpointing: bool = False
    """false. Recompute each block's activations in backward: less memory, ~30% more compute."""
    device: str = _choice("auto", "cpu", "cuda")
    """"auto" (cuda when available, else cpu), "cpu" or "cuda"."""
    dtype: str = _choice("auto", "bfloat16", "float32")
    """"auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16" or "float32": the autocast dtype."""
    seed: int = _bounded(0, ge=0)
    """0. Seeds the model init, the batch sampler and the random projections."""
    eval_every: int = _bounded(50, ge=1)
    """50. Steps between validation evaluations (and one at the end)."""
    eval_batches: int = _bounded(8, ge=1)
    """8. Validation batches per evaluation (fixed windows, same every time)."""
    log_every: int = _bounded(10, ge=1)
    """10. Steps between log lines; logging forces a host sync."""
    save_every: int = _bounded(100, ge=0)
    """100. Steps between checkpoints; 0 = only at the end."""
    keep_last: int = _bounded(2, ge=1)
    """2. Checkpoints kept on disk; older ones are deleted."""
    sample_tokens: int = _bounded(48, ge=0)
    """48. Tokens generated as a text sample at each evaluation; 0 = no sample."""
    legacy_eval_divisor: bool = False
    """false. true divides the summed eval loss by n + 1 as the official code does (biased low)."""
    dp_overlap: int = _bounded(2, ge=0)
    """2. Data parallel (torchrun) with release: gradients whose all-reduce may be in flight while backward goes
    on; each holds one gradient alive until its update. 0 = reduce and update each gradient at once (no overlap)."""
    fsdp: bool = False
    """false. Under torchrun (--nproc N): shard the int8 weights, float tensors and optimizer states across the N
    ranks with FSDP2 instead of replicating them (qtrain train --fsdp sets it); needs release = true."""
    cuda_graph: bool = False
    """false. CUDA only: capture one training step (forward, backward with its release updates) in a CUDA graph
    and replay it every step. Needs release, one micro-batch, one process, Triton kernels, stochastic rounding
    and APOLLO / APOLLO-Mini on every matrix, embedding and lm_head (see docs/performance.md)."""


@dataclass
class DataConfig:
    """[data]: corpus sources, tokenizer, validation, token shards and their cache."""

    corpus: str = "default"
    """"default" = the embedded corpus; else a file, a directory or a glob of .txt/.md, JSON lines
    (.jsonl/.json, .gz/.zst), Parquet, or a dataset saved with datasets.save_to_disk (see docs/recipes.md)."""
    sources: dict[str, Any] = field(default_factory=dict)
    """{} ([data.sources] table). A mixture: source -> weight (or {weight, text_field, split_blank_lines});
    replaces corpus. Each training window comes from a source with probability proportional to its weight."""
    validation: str = ""
    """"" = hold out val_fraction of the documents of each source; else a separate validation source."""
    text_field: str = "text"
    """"text". The JSON field / Parquet or Arrow column that holds each document's text."""
    split_blank_lines: int = _bounded(0, ge=0)
    """0 = one document per text file; N = a run of at least N blank lines ends a document."""
    val_fraction: float = _bounded(0.05, gt=0, lt=0.5)
    """0.05. Fraction of the documents held out for validation (whole documents, spread through every file)."""
    eval_tokens: int = _bounded(0, ge=0)
    """0 = train.eval_batches × batch_size × seq_len. Tokens per evaluation, in windows spread over the whole
    validation set."""
    tokenizer: str = ""
    """"" = train a sentencepiece BPE with model.vocab_size on a sample of the training documents; else a
    sentencepiece .model, a tokenizer.json or a Hugging Face tokenizer directory."""
    tokenizer_sample_mb: int = _bounded(200, ge=1)
    """200. Millions of characters of training documents fed to the tokenizer trainer (from up to 16 files
    spread through each source)."""
    tokenizer_sentences: int = _bounded(2_000_000, ge=1)
    """2000000. sentencepiece input_sentence_size: at most this many lines are kept, sampled uniformly
    (shuffle_input_sentence, seeded); bounds the trainer's memory."""
    prepare_workers: int = _bounded(0, ge=0)
    """0 = one per CPU core. Processes that tokenize the corpus into shards."""
    fingerprint: str = _choice("stat", "content")
    """"stat": a corpus is identified by its files' paths, sizes and mtimes; "content": by the sha256 of their bytes."""
    cache_dir: str = ""
    """"" = $QTRAIN_CACHE, else ~/.cache/qtrain. Holds the default corpus, tokenizers and token shards."""
    max_corpus_chars: int = _bounded(0, ge=0)
    """0 = no limit. Read only this many characters of each source (quick runs and tests)."""

    SOURCE_KEYS = ("weight", "text_field", "split_blank_lines")

    def source_problems(self) -> list[str]:
        """What is wrong with [data.sources] (checked with the other cross-key constraints)."""
        out = []
        if self.sources and self.corpus != "default":
            out.append(f'[data] corpus = "{self.corpus}" and [data.sources] are both set; list every source in '
                       f'[data.sources] (the embedded corpus is "default") and leave corpus = "default"')
        for spec, value in self.sources.items():
            opts = value if isinstance(value, dict) else {"weight": value}
            unknown = sorted(set(opts) - set(self.SOURCE_KEYS))
            if unknown:
                out.append(f'[data.sources] "{spec}": unknown key {unknown[0]!r}{_suggest(unknown[0], self.SOURCE_KEYS)}')
            w = opts.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
                out.append(f'[data.sources] "{spec}": the weight must be a number > 0, got {_show(w)}')
            if not isinstance(opts.get("text_field", ""), str):
                out.append(f'[data.sources] "{spec}": text_field must be a string')
            b = opts.get("split_blank_lines", 0)
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                out.append(f'[data.sources] "{spec}": split_blank_lines must be an integer >= 0')
        return out

    def cache_root(self) -> Path:
        """The cache directory: cache_dir if set, else $QTRAIN_CACHE, else ~/.cache/qtrain."""
        return Path(self.cache_dir or os.environ.get("QTRAIN_CACHE") or Path.home() / ".cache" / "qtrain").expanduser()


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "data": DataConfig,
}


@dataclass
class TrainConfig:
    """A whole recipe: one dataclass per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """[model]: architecture, read by build_model."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """[quant]: int8 weight storage, read by build_model."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """[optim] and [optim.args]: optimizers and LR schedule, read by build_optimizer."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """[train]: the loop, read by train."""
    data: DataConfig = field(default_factory=DataConfig)
    """[data]: corpus and tokenizer, read by prepare_data."""

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
        """Load a recipe file, apply `section.key=value` overrides, validate. Raises ConfigError."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"recipe file {str(path)!r} does not exist; the shipped recipes are in recipes/*.toml"],
                              source=str(path))
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"invalid TOML: {e}"], source=str(path)) from None
        return cls.from_dict(raw, overrides, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], overrides: Iterable[str] = (), source: str = "recipe") -> TrainConfig:
        """Build from a {section: {key: value}} dict (missing keys take defaults). Raises ConfigError."""
        d = copy.deepcopy(d)
        problems = _apply_overrides(d, list(overrides))
        bad: set[str] = set()  # "section.key" whose value was rejected: cross-field checks skip them
        for name in d:
            if name not in SECTIONS:
                problems.append(f"unknown section [{name}]{_suggest(name, SECTIONS, lambda s: f'[{s}]')}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            table = d.get(name, {})
            if not isinstance(table, dict):
                problems.append(f"[{name}] must be a table of keys, got {_show(table)}")
                table = {}
            fields = {f.name: f for f in dataclasses.fields(section_cls)}
            kwargs = {}
            for key, value in table.items():
                if key not in fields:
                    problems.append(f"[{name}] unknown key {key!r}{_suggest(key, fields)}")
                    continue
                try:
                    value = _coerce(fields[key], value)
                    _check_value(fields[key], value)
                except ValueError as e:
                    problems.append(f"[{name}] {key} = {_show(table[key])}: {e}")
                    bad.add(f"{name}.{key}")
                    continue
                kwargs[key] = value
            sections[name] = section_cls(**kwargs)
        cfg = cls(**sections)
        if cfg.model.init and "model.init" not in bad:
            model_table = d.get("model")
            problems += _init_problems(cfg, set(model_table) if isinstance(model_table, dict) else set(), bad)
        problems += cfg._cross_field_problems(bad)
        if problems:
            raise ConfigError(problems, source)
        return cfg

    def _cross_field_problems(self, bad: set[str]) -> list[str]:
        """Constraints between keys; a check is skipped when one of its keys was already rejected."""
        m, t, o, dc = self.model, self.train, self.optim, self.data

        def ok(*keys: str) -> bool:
            return not bad.intersection(keys)

        out = []
        if m.head_size:
            if m.head_size % 2 and ok("model.head_size"):
                out.append(f"[model] head_size = {m.head_size} must be even (RoPE rotates pairs of dimensions)")
        elif ok("model.hidden_size", "model.num_heads"):
            if m.hidden_size % m.num_heads:
                out.append(f"[model] num_heads = {m.num_heads} must divide hidden_size = {m.hidden_size}; "
                           f"choose a divisor of {m.hidden_size}")
            elif m.head_dim % 2:
                out.append(f"[model] head_dim = hidden_size / num_heads = {m.hidden_size} / {m.num_heads} = "
                           f"{m.head_dim} must be even (RoPE rotates pairs of dimensions); change num_heads")
        if ok("model.num_heads", "model.num_kv_heads") and m.num_kv_heads and m.num_heads % m.num_kv_heads:
            out.append(f"[model] num_kv_heads = {m.num_kv_heads} must divide num_heads = {m.num_heads}; "
                       f"use a divisor of {m.num_heads}, or 0 for num_kv_heads = num_heads")
        if ok("train.seq_len", "model.max_seq_len") and t.seq_len > m.max_seq_len:
            out.append(f"[train] seq_len = {t.seq_len} exceeds [model] max_seq_len = {m.max_seq_len}; "
                       f"lower train.seq_len or raise model.max_seq_len")
        if ok("train.release", "train.grad_accum_steps") and t.release and t.grad_accum_steps > 1:
            out.append(f"[train] release = true cannot be combined with grad_accum_steps = {t.grad_accum_steps}; "
                       f"set grad_accum_steps = 1 or release = false")
        if t.cuda_graph:
            out += self._cuda_graph_problems()
        if ok("train.fsdp", "train.release") and t.fsdp and not t.release:
            out.append("[train] fsdp = true updates each shard inside backward: it needs release = true "
                       "(and grad_accum_steps = 1)")
        if ok("optim.method") and not o.method.strip():
            out.append('[optim] method = "": name an optimizer method, e.g. "apollo" or "apollo_mini"')
        if ok("data.corpus") and not dc.corpus.strip():
            out.append('[data] corpus = "": use "default" for the embedded corpus or give a path')
        if ok("data.sources", "data.corpus"):
            out += dc.source_problems()
        return out

    def _cuda_graph_problems(self) -> list[str]:
        """What keeps [train] cuda_graph = true from capturing the step: each part of its hot path must read its
        per-step values on the device (qtrain.core.step_state). On a CPU run nothing is captured: the same step
        runs eagerly (the 7B recipes ship cuda_graph = true and still run on a CPU)."""
        t, o, q = self.train, self.optim, self.quant
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

    def apply_overrides(self, overrides: Iterable[str]) -> TrainConfig:
        """A new, validated config with `section.key=value` overrides applied (self is unchanged)."""
        return TrainConfig.from_dict(self.to_dict(), overrides, source="overrides")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain {section: {key: value}} with lists for tuples; from_dict(to_dict()) == self."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    def to_toml(self) -> str:
        """The config as TOML text (every key, explicit); from_toml reads it back to an equal config."""
        lines = []
        for name, table in self.to_dict().items():
            lines.append(f"[{name}]")
            subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if k not in subtables]
            for sub, values in subtables.items():
                lines += ["", f"[{name}.{sub}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


# --- [model] init: a Hugging Face checkpoint's config.json, read with the standard library (no torch) ---------
# transformers' defaults, per family, for the keys a config.json may leave out (older Llama checkpoints omit
# num_key_value_heads and rope_theta); tests/test_pretrained.py checks them against transformers' own classes
CHECKPOINT_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048, "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "head_dim": None, "max_position_embeddings": 32768, "sliding_window": None},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768, "sliding_window": None},
}
CHECKPOINT_COMMON_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
REQUIRED_CHECKPOINT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_checkpoint_config(init: str) -> dict:
    """The config.json of the checkpoint directory `init`, checked to be a supported model type.

    Raises ValueError with the message a user sees (it names [model] init and the fix).
    """
    path = Path(init).expanduser()
    where = f'[model] init = "{init}"'
    if not path.is_dir():
        raise ValueError(f'{where}: no such directory; point it at a local Hugging Face model directory '
                         f'(config.json + *.safetensors), or set it to "" for a random init')
    if not (path / "config.json").is_file():
        raise ValueError(f"{where}: the directory has no config.json, so it is not a Hugging Face model directory; "
                         f"point init at the directory that holds config.json and the *.safetensors weights")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: config.json is not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; qtrain trains {', '.join(FAMILIES)} "
                         f"(transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)")
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if not isinstance(raw.get(k), int)]
    if missing:
        raise ValueError(f"{where}: config.json has no integer {missing[0]}; is it a complete {model_type} config?")
    return raw


def checkpoint_model_keys(raw: dict) -> tuple[dict[str, Any], int | None]:
    """([model] keys as a checkpoint's config.json sets them, the attention window of its sliding layers or None)."""
    defaults = {**CHECKPOINT_COMMON_DEFAULTS, **CHECKPOINT_DEFAULTS[raw["model_type"]]}

    def get(key: str):
        return raw[key] if raw.get(key) is not None else defaults.get(key)

    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = get("head_dim") or hidden // heads
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    keys = {
        "family": raw["model_type"],
        "hidden_size": hidden,
        "intermediate_size": raw["intermediate_size"],
        "num_layers": raw["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": get("num_key_value_heads") or heads,
        "head_size": 0 if head_dim == hidden // heads else head_dim,
        "vocab_size": raw["vocab_size"],
        "max_seq_len": get("max_position_embeddings"),
        "rope_theta": float(theta if theta is not None else get("rope_theta")),
        "rms_norm_eps": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
    }
    window = get("sliding_window")
    sliding = (raw["model_type"] == "mistral" or bool(raw.get("use_sliding_window"))
               or "sliding_attention" in (raw.get("layer_types") or []))
    return keys, window if sliding and window else None


def _init_problems(cfg: TrainConfig, given: set[str], bad: set[str]) -> list[str]:
    """[model] init: family and shape keys come from the checkpoint's config.json. A recipe may repeat them
    (a run's recipe.toml does), never contradict them: each disagreeing key is a problem naming both values."""
    m = cfg.model
    path = Path(m.init).expanduser()
    if not path.exists():  # an error when the model is built; `qtrain estimate` can size the recipe's own keys first
        return []
    try:
        keys, sliding_window = checkpoint_model_keys(read_checkpoint_config(m.init))
    except ValueError as e:
        return [str(e)]
    heads, width = keys["num_heads"], keys["hidden_size"] // keys["num_heads"]
    same = {"num_kv_heads": lambda a, b: (a or heads) == (b or heads),  # 0 means num_heads
            "head_size": lambda a, b: (a or width) == (b or width)}  # 0 means hidden_size / num_heads
    out = []
    for key, value in keys.items():
        now = getattr(m, key)
        if key in given and f"model.{key}" not in bad and not same.get(key, operator.eq)(now, value):
            out.append(f"[model] {key} = {_show(now)} but the checkpoint's config.json ({path}) has {_show(value)}: "
                       f"remove model.{key} from the recipe (the checkpoint sets it) or set it to {_show(value)}")
        else:
            setattr(m, key, value)
    if sliding_window and cfg.train.seq_len > sliding_window and "train.seq_len" not in bad:
        out.append(f"[train] seq_len = {cfg.train.seq_len} exceeds the checkpoint's sliding_window = {sliding_window} "
                   f"({path}); qtrain attends causally over the whole sequence, so lower train.seq_len to "
                   f"<= {sliding_window}")
    return out


# --- parsing helpers -----------------------------------------------------------------------------------


def _apply_overrides(d: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply `section.key=value` (or `optim.args.name=value`) to d in place; returns the problems found.

    The value is parsed as a TOML value (`[0.9, 0.95]`, `true`, `"x"`); text that is not valid TOML, or
    that targets a string key, is taken as a bare string, so `data.corpus=/data/c4.jsonl.gz` works.
    An `optim.method` override naming another method than the recipe's empties [optim.args] first: those
    were written for the recipe's method (APOLLO-Mini's scale 128 means nothing to GaLore), so the new
    method starts from its defaults, and `optim.args...` overrides (in any position) apply on top.
    """
    problems = []
    parsed = []  # (item, key path, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        path = [p.strip() for p in key.strip().split(".")]
        if not sep or len(path) < 2 or not all(path):
            problems.append(f"override {item!r} must look like section.key=value, e.g. train.steps=10")
            continue
        text = text.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if len(path) == 2 and _field_type(*path) == "str" and not isinstance(value, str):
            value = text  # data.tokenizer=2048 means the file "2048", not an integer
        parsed.append((item, path, value))
    methods = [value for _, path, value in parsed if path == ["optim", "method"]]
    optim = d.get("optim")
    if methods and isinstance(optim, dict) and methods[-1] != optim.get("method", OptimConfig.method):
        optim["args"] = {}
    for item, path, value in parsed:
        table = d
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                problems.append(f"override {item!r}: {'.'.join(path[:-1])} is not a table")
                break
        else:
            table[path[-1]] = value
    return problems


def _field_type(section: str, key: str) -> str | None:
    fields = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
    return fields.get(key)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "tuple[float, float]": "a list of two numbers", "dict[str, Any]": "a table"}


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check value against the field's annotation; ints become floats for float fields. Raises ValueError."""
    kind = f.type  # a string: `from __future__ import annotations`
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)  # bools are not ints
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and is_number:
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "dict[str, Any]" and isinstance(value, dict):
        return value
    if kind == "tuple[float, float]" and isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        b1, b2 = float(value[0]), float(value[1])
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError("each beta must be in [0, 1)")
        return (b1, b2)
    raise ValueError(f"expected {_EXPECTED[kind]}")


def _check_value(f: dataclasses.Field, value: Any) -> None:
    """Range and allowed-value checks declared in the field's metadata. Raises ValueError."""
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {_show(close[0])}?)" if close else ""
        raise ValueError(f"allowed values are {', '.join(_show(c) for c in choices)}{hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    bounds = f.metadata.get("bounds", {})
    if not all(test(value, bounds[k]) for k, (_, test) in _BOUND_OPS.items() if k in bounds):
        raise ValueError("must be " + " and ".join(f"{sym} {_show(bounds[k])}" for k, (sym, _) in _BOUND_OPS.items() if k in bounds))


_BOUND_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _suggest(name: str, valid: Iterable[str], show: Callable[[str], str] = repr) -> str:
    """' (did you mean X?)' with the closest valid name, else the list of valid names."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {show(close[0])}?)" if close else f"; valid: {', '.join(show(v) for v in valid)}"


def _show(value: Any) -> str:
    """A value as it would be written in TOML (used in error messages)."""
    return _toml_value(value) if isinstance(value, (str, bool, int, float, list, tuple)) else repr(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
