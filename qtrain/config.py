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


@dataclass
class ModelConfig:
    """[model]: the LLaMA architecture (becomes a transformers LlamaConfig)."""

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
        """Per-head width: hidden_size / num_heads."""
        return self.hidden_size // self.num_heads


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


@dataclass
class DataConfig:
    """[data]: corpus, tokenizer, validation split and on-disk cache."""

    corpus: str = "default"
    """"default" = the embedded corpus; else a text file, a directory of .txt/.md, or .jsonl(.gz) with "text"."""
    tokenizer: str = ""
    """"" = train a sentencepiece model on the corpus with model.vocab_size; else a path to a .model file."""
    val_fraction: float = _bounded(0.05, gt=0, lt=0.5)
    """0.05. The last val_fraction of the corpus tokens is held out for validation."""
    cache_dir: str = ""
    """"" = $QTRAIN_CACHE, else ~/.cache/qtrain. Holds the default corpus, tokenizers and token files."""
    max_corpus_chars: int = _bounded(0, ge=0)
    """0 = no limit. Truncate the corpus text to this many characters before tokenizing."""

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
        if ok("model.hidden_size", "model.num_heads"):
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
        if ok("optim.method") and not o.method.strip():
            out.append('[optim] method = "": name an optimizer method, e.g. "apollo" or "apollo_mini"')
        if ok("data.corpus") and not dc.corpus.strip():
            out.append('[data] corpus = "": use "default" for the embedded corpus or give a path')
        return out

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
