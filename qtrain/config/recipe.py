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

from qtrain.config import rules
from qtrain.errors import ConfigError


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
    """`""` = random init from the keys below. Otherwise a Hugging Face model directory (`config.json` +
    `*.safetensors`, sharded or not) to start from: continued pretraining or fine-tuning. Its `config.json` sets
    `family` and every shape key: the recipe file's shape keys give way (so `finetune-tiny`, `tiny` or any recipe
    takes a checkpoint of any shape, and the run header lists what the checkpoint set and which recipe values it
    replaced); only a shape key given on the command line (`--set model.hidden_size=...`) that disagrees is an error
    naming both values. While the directory is not there, `qtrain estimate` sizes the recipe's own keys (the shipped
    fine-tuning recipes repeat their checkpoint's shape for that). `qtrain train` checks the directory before
    anything is built or written: a missing directory or `config.json`, missing shards, or a `.safetensors` file cut
    short is an error naming the file and the fix. The weights are read tensor by tensor and each projection is
    quantized as it arrives (neither host nor GPU holds the model in float); the checkpoint's tokenizer is the run's
    unless `data.tokenizer` names another. See "Starting from a Hugging Face checkpoint" below."""
    family: str = _choice(*FAMILIES)
    """The transformers model: `LlamaForCausalLM` (Llama 1/2/3), `MistralForCausalLM`, `Qwen2ForCausalLM` (Qwen2 and
    Qwen2.5: q/k/v biases, kept as float parameters trained by the float optimizer), `Qwen3ForCausalLM` (q/k
    RMSNorms). With `init`, the checkpoint's `model_type`."""
    hidden_size: int = _bounded(64, ge=1)
    """Residual width *d*. Weight memory grows as *d*², activation memory as *d*."""
    intermediate_size: int = _bounded(176, ge=1)
    """SwiGLU MLP width (LLaMA: about 8/3·*d*). Each layer has 3 weights of *d* × this size."""
    num_layers: int = _bounded(2, ge=1)
    """Transformer blocks. Memory and step time grow linearly."""
    num_heads: int = _bounded(4, ge=1)
    """Query heads. head_dim = *d* / num_heads; RoPE rotates pairs of dimensions, so head_dim must be even."""
    num_kv_heads: int = _bounded(0, ge=0)
    """0 = same as `num_heads` (multi-head attention). Fewer heads (GQA) shrink the k/v weights and the KV
    activations."""
    head_size: int = _bounded(0, ge=0)
    """0 = `hidden_size / num_heads`. A per-head width of its own, as Qwen3 checkpoints have (128 at every width);
    then `num_heads` need not divide `hidden_size`."""
    vocab_size: int = _bounded(2048, ge=1)
    """The embedding and the lm_head are each `vocab_size` × *d* float tensors. These dominate memory for small
    models."""
    max_seq_len: int = _bounded(256, ge=1)
    """Longest sequence the model accepts (`max_position_embeddings`)."""
    rope_theta: float = _bounded(10000.0, gt=0)
    """RoPE base frequency."""
    init_std: float = _bounded(0.02, gt=0)
    """Std of the normal init of every linear and of the embedding."""
    rms_norm_eps: float = _bounded(1e-6, gt=0)
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the embedding with the lm_head. This saves `vocab_size` × *d* parameters plus their optimizer state."""
    attn_implementation: str = _choice("sdpa", "eager")
    """`"sdpa"` is fused attention: faster, and it does not store the T×T attention matrix. Use `"eager"` for
    debugging."""
    float_dtype: str = _choice("float32", "bfloat16")
    """Storage dtype of the embedding, norms and lm_head. `"bfloat16"` halves their memory; their updates are then
    applied with stochastic rounding to bf16 (no fp32 master copy)."""

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
    """Store every transformer linear as uint8 codes plus a scale and offset per group: about 1 byte per weight,
    against 2 (bf16) or 4 (fp32). The embedding, norms and lm_head stay float."""
    group_size: int = _bounded(128, ge=1)
    """Consecutive weights that share one scale and offset. Smaller groups track ranges more finely, at a cost of 2
    meta values per group."""
    meta_dtype: str = _choice("float32", "bfloat16")
    """Dtype of each group's scale and offset: 8 or 4 bytes per group."""
    rounding: str = _choice("stochastic", "nearest")
    """Rounding of updated weights back to int8. Stochastic rounding is unbiased, so updates below half a
    quantization step still count in expectation. Nearest rounding loses them, and training stalls once the LR is
    small."""
    kernels: str = _choice("auto", "torch", "triton")
    """Backend of int8 dequantize and the fused update: `"auto"` uses the Triton kernels on CUDA (power-of-two group
    size; fp32 or bf16 metadata) and the plain-torch reference elsewhere; the two are tested against each other."""
    matmul: str = _choice("dequantize", "fused")
    """How int8 projections multiply. `"dequantize"`: Ŵ is written in the compute dtype, then a cuBLAS GEMM.
    `"fused"`: one Triton kernel dequantizes weight tiles inside the GEMM (forward and input gradient), so Ŵ never
    exists in memory; used where the Triton kernels run (`kernels`), else the dequantize path.
    `tools/bench_matmul.py` measures which is faster on your GPU; both are tested against each other."""


@dataclass
class OptimConfig:
    """[optim]: the matrix optimizer (APOLLO family), the float-tensor optimizer and the LR schedule."""

    method: str = "apollo_mini"
    """Optimizer for the 2-D transformer weights. APOLLO state is 2·r·max(m, n) floats per matrix."""
    args: dict[str, Any] = field(default_factory=dict)
    """Method hyperparameters, passed through untouched."""
    lr: float = _bounded(0.01, gt=0)
    """Peak LR of the matrix optimizer."""
    warmup_frac: float = _bounded(0.1, ge=0, lt=1)
    """Linear warmup from 0 to `lr` over this fraction of `train.steps`."""
    min_lr_ratio: float = _bounded(0.1, ge=0, le=1)
    """Cosine decay from `lr` down to `min_lr_ratio` × `lr` at the last step."""
    weight_decay: float = _bounded(0.0, ge=0)
    """Decoupled weight decay on the matrix weights."""
    float_optimizer: str = _choice("adam8bit", "adamw")
    """Optimizer for the float tensors (embedding, norms, lm_head). `"adam8bit"` is bitsandbytes, needs CUDA and
    keeps 2 bytes of state per parameter. `"adamw"` is torch, keeps 8 bytes and runs anywhere."""
    float_lr: float = _bounded(0.0, ge=0)
    """Peak LR of the float tensors, on the same schedule. 0 = same as `lr`."""
    float_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas of the float optimizer."""
    float_eps: float = _bounded(1e-8, gt=0)
    """Adam epsilon of the float optimizer."""
    float_grad_clip: float = _bounded(0.0, ge=0)
    """Per-tensor gradient-norm clip for the float tensors, which have no norm-growth limiter. 0 = off."""
    lm_head_optimizer: str = _choice("adam", "same_as_matrices")
    """`"adam"` keeps the lm_head float under the float optimizer, as the papers do. `"same_as_matrices"` steps it
    with `method` (it stays a float tensor)."""
    embedding_optimizer: str = _choice("adam", "same_as_matrices")
    """Same choice for the token embedding. With APOLLO-Mini, `"same_as_matrices"` needs 2 × vocab_size floats of
    state instead of Adam's 2 × vocab_size × d (the leanest 7B recipe uses it)."""

    @property
    def float_lr_value(self) -> float:
        """Peak LR of the float tensors: float_lr, or lr when float_lr is 0."""
        return self.float_lr or self.lr


@dataclass
class LoopConfig:
    """[train]: the training loop: steps, batch shape, memory switches, evaluation and checkpoints."""

    steps: int = _bounded(200, ge=1)
    """Optimizer steps. The LR schedule spans exactly this many."""
    batch_size: int = _bounded(8, ge=1)
    """Sequences per micro-batch. Activation memory grows linearly. The papers use 512 sequences × 256 tokens per
    step."""
    seq_len: int = _bounded(128, ge=1)
    """Tokens per training sequence. Activation memory grows linearly (with sdpa)."""
    grad_accum_steps: int = _bounded(1, ge=1)
    """Micro-batches per optimizer step. Tokens per step = `batch_size` × `seq_len` × this."""
    release: bool = True
    """Layer-wise gradient release: each weight is stepped inside backward and its gradient freed at once, so no
    full set of gradients is ever held. Because it steps every micro-batch, it cannot accumulate."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward: much less activation memory, about 30% more compute."""
    device: str = _choice("auto", "cpu", "cuda")
    """`"auto"` picks CUDA when it is available, else the CPU."""
    dtype: str = _choice("auto", "bfloat16", "float32")
    """Autocast dtype. `"auto"` is bfloat16 on CUDA and float32 on the CPU."""
    seed: int = _bounded(0, ge=0)
    """Seeds the model init, the batch sampler and the random projections."""
    eval_every: int = _bounded(50, ge=1)
    """Steps between validation evaluations; there is also one at the end."""
    eval_batches: int = _bounded(8, ge=1)
    """Validation batches per evaluation. The windows are fixed and the same every time."""
    log_every: int = _bounded(10, ge=1)
    """Steps between log lines. Each one forces a host sync."""
    save_every: int = _bounded(100, ge=0)
    """Steps between checkpoints. 0 = only at the end."""
    keep_last: int = _bounded(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted."""
    sample_tokens: int = _bounded(48, ge=0)
    """Tokens of generated text shown at each evaluation. 0 = no sample."""
    legacy_eval_divisor: bool = False
    """`true` divides the summed eval loss by n + 1, as the official code does (biased low), for comparison with its
    numbers."""
    dp_overlap: int = _bounded(2, ge=0)
    """Data parallel (torchrun, [docs/distributed.md](distributed.md)) with release: how many gradient all-reduces
    may be in flight while backward goes on; each keeps its gradient alive until its update. 0 reduces and updates
    each gradient at once (no overlap, least memory). Same numbers either way."""
    fsdp: bool = False
    """Under torchrun (`--nproc N`): shard the int8 weights, the float tensors and every optimizer state across the
    N ranks with FSDP2 instead of replicating them ([docs/distributed.md](distributed.md)); `qtrain train --fsdp`
    sets it. Needs `release = true` and method `apollo` or `apollo_mini`; what else it does not take is refused at
    start with what to change. Same numbers as one process (CPU, 2 ranks: bit for bit)."""
    cuda_graph: bool = False
    """CUDA only, not yet run on a GPU: capture one whole training step (forward, backward and every release update
    inside it) in a CUDA graph after a few eager steps, then replay it each step, so the host issues one launch
    instead of thousands; a CPU run steps eagerly. `7b.toml` and `7b-8gb.toml` ship `true`. Needs `release = true`,
    `grad_accum_steps = 1`, one process, `quant.kernels = "auto"`, `quant.rounding = "stochastic"`, method `apollo`
    or `apollo_mini`, and an Adam `lm_head_optimizer` / `embedding_optimizer` needs `float_optimizer = "adam8bit"`
    (qtrain's 8-bit Adam kernel, which reads the LR and step on the device, replaces bitsandbytes' for them);
    anything else is refused with what to change. Same update rule; see [docs/performance.md](performance.md)."""


@dataclass
class DataConfig:
    """[data]: corpus sources, tokenizer, validation, token shards and their cache."""

    corpus: str = "default"
    """`"default"` is the embedded corpus: Python's pydoc topics plus stdlib docstrings, about 1.8 MB, extracted at
    first use. Otherwise a **file** read by its kind: `.txt` / `.md` (or any other name) as text, see
    `split_blank_lines`; `.jsonl` / `.json` / `.ndjson` as JSON lines (one document per line, from `text_field`),
    each optionally `.gz` or `.zst` (C4 and Dolma ship `.json.gz`); `.parquet` (C4, FineWeb, SlimPajama, Dolma
    layouts: the `text_field` column, read one record batch at a time); `.arrow` files of a dataset saved with
    Hugging Face `datasets` (`save_to_disk`). A **directory**: every such file below it, sorted by path; when it
    holds JSON lines, Parquet or Arrow files only those are read (a `README.md` beside Parquet shards is not a
    document), else every `.txt` / `.md`; a plain `.json` in a directory is not read (configs, `dataset_info.json`);
    files and directories whose name starts with `.` are skipped. A `save_to_disk` directory is read in its own file
    order; a saved `DatasetDict` by its `"train"` split. A **glob** (`"/data/c4/en/c4-train.*.json.gz"`, `**`
    recursive) reads the matching files in sorted order. Every file is streamed (never read whole). Documents are
    stripped; empty ones, and null texts in columnar files, are dropped. Undecodable (non-UTF-8) bytes are skipped,
    with a warning that names the file and the byte count."""
    sources: dict[str, Any] = field(default_factory=dict)
    """A mixture, replacing `corpus` (which must then stay `"default"`; name the embedded corpus `"default"` in the
    table if you want it). Each training window first draws its source with probability weight / sum of weights,
    then a uniform start inside that source's training tokens, so the weights hold whatever the sizes (a small
    source is repeated more often). Each source is tokenized into its own shards, shared by every mixture that uses
    it. Validation windows are shared among the sources by weight. Changing a weight changes the data stream: a
    resume is refused."""
    validation: str = ""
    """`""` holds out `val_fraction` of the documents of every source. A source (file, directory, glob; a saved
    `DatasetDict` gives its `"validation"`, else `"test"`, split) is used as the whole validation set instead, and
    nothing is held out of the training sources; e.g. C4's `c4-validation.*.json.gz`."""
    text_field: str = "text"
    """The JSON field, or the Parquet / Arrow column, that holds each document's text. A JSON line without it is an
    error naming the line; a Parquet file without the column is an error listing its columns."""
    split_blank_lines: int = _bounded(1, ge=0)
    """Text files only. `1` (the default): a blank (whitespace-only) line ends a document, so a book's paragraphs
    are its documents. `N`: a run of at least `N` blank lines ends one, e.g. `2` for paragraphs apart by one blank
    line and documents by two. `0`: one document per file. A source with too few documents to hold out whole ones
    validates on the tail of its tokens. A document longer than 4 MB is tokenized in pieces cut at line ends (each
    piece encoded on its own, so sentencepiece adds its word-start marker at each cut) with one EOS after the last."""
    val_fraction: float = _bounded(0.05, gt=0, lt=0.5)
    """Fraction of the **documents** held out for validation, never a cut through one: document *j* of file *i* is
    held out when (*j*·f + u_i, (*j*+1)·f + u_i] holds an integer, u_i a fixed hash of *i*, so exactly one document
    in every 1/f of each file, spread evenly through it (a directory of one-document files holds out a fraction f of
    its files). The tokenizer never trains on them. A source with too few documents for that (one book without blank
    lines, a dump of a few huge documents: decided before anything is tokenized, from at most its first 32 M
    characters) validates instead on the last `val_fraction` of its token stream (at least one window), and the run
    header says so ([docs/data.md](data.md#validation)). Both splits need at least `train.seq_len + 1` tokens; a
    source that cannot hold both is refused before the tokenizer is trained. Ignored with `validation`."""
    eval_tokens: int = _bounded(0, ge=0)
    """Tokens per evaluation. `0`: `train.eval_batches` × `batch_size` × `seq_len`. Else `eval_tokens // seq_len`
    windows (at least one). The windows are non-overlapping tiles of the validation stream spread evenly from its
    first token to its last (all tiles when it has fewer), the same at every evaluation. `qtrain eval --batches N`
    overrides it."""
    tokenizer: str = ""
    """`""` trains a BPE sentencepiece model with `model.vocab_size` pieces on a sample of the training documents
    (below) and caches it. Special ids: unk 0, bos 1, eos 2, pad 3. A `tokenizer.json` or a directory holding one is
    loaded with `transformers` (`AutoTokenizer`, local files only); a bare `tokenizer.json` takes its EOS from its
    special tokens (`</s>`, `<|endoftext|>`, `<eos>`, `<|end_of_text|>`). Its piece count must equal
    `model.vocab_size`. The tokenizer is copied into the run directory, and an export carries it."""
    tokenizer_sample_mb: int = _bounded(200, ge=1)
    """Millions of characters of training documents fed to the tokenizer trainer: each source's share (by weight)
    comes from the start of up to 16 of its files spread evenly through its file list (with `max_corpus_chars`, from
    the start of the truncated stream)."""
    tokenizer_sentences: int = _bounded(2_000_000, ge=1)
    """sentencepiece's `input_sentence_size`: the documents are cut into lines (at most 4096 characters) and, when
    there are more, sentencepiece keeps a uniform random sample of this many (`shuffle_input_sentence`, seeded: the
    same tokenizer every time). This bounds the trainer's memory: measured 0.58 GB at 1M and 1.09 GB peak RSS at 2M
    lines for 32000 pieces."""
    prepare_workers: int = _bounded(0, ge=0)
    """Processes that tokenize the corpus into shards; `0` = one per CPU core (fewer for a small corpus; one encodes
    in the main process). The token shards are the same whatever the number. Each worker holds its tokenizer and at
    most one 8 M-character unit of text."""
    fingerprint: str = _choice("stat", "content")
    """How a corpus is identified (token shard cache, tokenizer cache, and the identity a checkpoint records so that
    `--resume` refuses other data): `"stat"` by each file's path, size and modification time, nothing read;
    `"content"` by the sha256 of every file's bytes (reads the whole corpus at each start; survives copying the
    corpus elsewhere). The embedded corpus is identified by its version and size."""
    cache_dir: str = ""
    """Where the default corpus, trained tokenizers and token shards are kept. `""` means `$QTRAIN_CACHE`, or
    `~/.cache/qtrain` when that is unset. Shards take 2 bytes per token (4 above 65536 pieces), about half the size
    of the text."""
    max_corpus_chars: int = _bounded(0, ge=0)
    """Read only this many characters of each source (a cut at the end of the budget may fall inside a document). 0
    = no limit. Useful for quick runs and tests."""
    skip_unreadable: bool = False
    """`false`: a damaged corpus file (a `.gz` that is not gzip, a CRC error, a truncated `.gz` / `.zst`, a corrupt
    Parquet page) stops `qtrain prepare` / `train` with an error that names the file, the byte offset on disk and
    the documents read fine before it (those and the other files are intact). `true`: keep the documents before the
    damage, leave out the rest of that file, and warn (`UnreadableFileWarning`). Part of no cache key: the same
    damage gives the same documents."""
    format: str = _choice("auto", "text", "prompt_completion", "chat")
    """What a JSONL corpus is. `"auto"`: its first record decides: `text_field` means plain text,
    `prompt`/`completion` fine-tuning pairs, `messages` a chat; a record with both `text_field` and fine-tuning
    fields is refused as ambiguous. Any other value is followed whatever the records also hold. The run header says
    which format was used and why."""

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
            b = opts.get("split_blank_lines", 1)
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
    init_replaced: dict[str, tuple[Any, Any]] = field(default_factory=dict, compare=False, repr=False)
    """[model] key -> (the recipe's value, the checkpoint's) for each shape key [model] init's config.json
    replaced: the run header lists them. Not a recipe key."""

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
        d, overrides = copy.deepcopy(d), list(overrides)
        problems = _apply_overrides(d, overrides)
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
            given = set(model_table) if isinstance(model_table, dict) else set()
            problems += _init_problems(cfg, given, _override_keys(overrides, "model"), bad)
        problems += rules.recipe_problems(cfg, bad)  # the constraints between keys (qtrain.config.rules)
        if problems:
            raise ConfigError(problems, source)
        return cfg

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

    Raises ConfigError with the message a user sees (it names [model] init and the fix).
    """
    path = Path(init).expanduser()

    def refuse(problem: str) -> ConfigError:
        return ConfigError([f'[model] init = "{init}": {problem}'], source="[model] init")

    if not path.is_dir():
        raise refuse('no such directory; point it at a local Hugging Face model directory (config.json + '
                     f'*.safetensors; a qtrain run makes one: `qtrain train tiny --out runs/tiny && qtrain export '
                     f'runs/tiny --to {init}`), or set it to "" for a random init')
    if not (path / "config.json").is_file():
        raise refuse("the directory has no config.json, so it is not a Hugging Face model directory; point init at "
                     "the directory that holds config.json and the *.safetensors weights")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise refuse(f"config.json is not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise refuse(f"model_type {model_type!r} is not supported; qtrain trains {', '.join(FAMILIES)} "
                     f"(transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)")
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if not isinstance(raw.get(k), int)]
    if missing:
        raise refuse(f"config.json has no integer {missing[0]}; is it a complete {model_type} config?")
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


def _init_problems(cfg: TrainConfig, given: set[str], explicit: set[str], bad: set[str]) -> list[str]:
    """[model] init: family and shape keys come from the checkpoint's config.json, and the recipe file's values
    give way (so a template such as finetune-tiny takes any checkpoint; cfg.init_replaced records each recipe key
    `given` that changed).
    Only a key given explicitly as an override (`--set model.hidden_size=...`) must agree: each one that does
    not is a problem naming both values."""
    m = cfg.model
    path = Path(m.init).expanduser()
    if not path.exists():  # an error when the model is built; `qtrain estimate` can size the recipe's own keys first
        return []
    try:
        keys, sliding_window = checkpoint_model_keys(read_checkpoint_config(m.init))
    except ConfigError as e:
        return e.problems
    heads, width = keys["num_heads"], keys["hidden_size"] // keys["num_heads"]
    same = {"num_kv_heads": lambda a, b: (a or heads) == (b or heads),  # 0 means num_heads
            "head_size": lambda a, b: (a or width) == (b or width)}  # 0 means hidden_size / num_heads
    out = []
    for key, value in keys.items():
        now = getattr(m, key)
        if same.get(key, operator.eq)(now, value) or f"model.{key}" in bad:
            setattr(m, key, value)
        elif key in explicit:
            bad.add(f"model.{key}")  # cross-field checks skip it: the fix is to this key
            out.append(f"--set model.{key}={_show(now)} but the checkpoint's config.json ({path}) has "
                       f"{_show(value)}: leave model.{key} out (the checkpoint sets it) or set it to {_show(value)}")
        else:
            if key in given:
                cfg.init_replaced[key] = (now, value)
            setattr(m, key, value)
    if sliding_window and cfg.train.seq_len > sliding_window and "train.seq_len" not in bad:
        out.append(f"[train] seq_len = {cfg.train.seq_len} exceeds the checkpoint's sliding_window = {sliding_window} "
                   f"({path}); qtrain attends causally over the whole sequence, so lower train.seq_len to "
                   f"<= {sliding_window}")
    return out


def parse_key(key: str, text: str) -> Any:
    """The value of one recipe key given as text (a command-line flag standing for `--set key=value`), parsed
    and checked exactly as that override is: type, range, allowed values. Raises ConfigError naming the range."""
    d: dict[str, Any] = {}
    problems = _apply_overrides(d, [f"{key}={text}"])
    section, _, name = key.partition(".")
    field_ = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]  # a KeyError is a bug of the caller
    if not problems:
        value = d[section][name]
        try:
            value = _coerce(field_, value)
            _check_value(field_, value)
            return value
        except ValueError as e:
            problems.append(f"[{section}] {name} = {text}: {e}")
    raise ConfigError(problems, source=f"{key} (set from the command line)")


# --- parsing helpers -----------------------------------------------------------------------------------


def _override_keys(overrides: Iterable[str], section: str) -> set[str]:
    """The keys of `section` that `section.key=value` overrides set (whatever their values)."""
    keys = set()
    for item in overrides:
        path = [p.strip() for p in item.partition("=")[0].split(".")]
        if len(path) == 2 and path[0] == section:
            keys.add(path[1])
    return keys


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
