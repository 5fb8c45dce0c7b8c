"""Start from a Hugging Face checkpoint: its config, its tokenizer, and its weights, loaded tensor by tensor.

A checkpoint is a local directory as `save_pretrained` writes it: config.json, the weights in
model.safetensors or in shards listed by model.safetensors.index.json, and the tokenizer files. Nothing is
fetched from a hub. `[model] init = "DIR"` makes it the start of a run:
- config.json decides the architecture: qtrain.config.recipe reads the recipe's [model] keys from it (and rejects a
  recipe key that disagrees), `checkpoint_config` gives the transformers config qtrain.model.builder builds the model
  from (rope scaling and every other detail included), checked to agree with those keys;
- `load_checkpoint_` fills the model qtrain.model.builder allocated (int8 codes for the seven projections, float
  tensors for the rest): each projection is read as the file stores it (usually bf16) in row pieces of
  LOAD_CHUNK_ELEMS, each piece becomes fp32 on the training device, is quantized to int8 and freed, so
  neither host nor GPU ever holds the model in float. A file is memory-mapped for one tensor at a time, so
  host memory peaks at the model (on the CPU) plus one stored tensor plus one piece's transients: below
  the int8 model plus one shard (measured in tests/test_pretrained.py);
- `checkpoint_tokenizer` is the tokenizer a run uses unless [data] tokenizer names another.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qtrain.config.recipe import read_checkpoint_config
from qtrain.errors import ConfigError, TrainingError
from qtrain.quant.groupwise import quantize_groupwise
from qtrain.quant.linear import Int8Linear

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Stored by some older checkpoints, recomputed by transformers: never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# A stored tensor is read and converted in row pieces of at most this many elements: the fp32 transient of
# quantizing one piece (and the host copy of it) stays near 1 MiB whatever the model's size.
LOAD_CHUNK_ELEMS = 2**18


def _error(init: str | Path, problem: str) -> TrainingError:
    return TrainingError(f'[model] init = "{init}": {problem}')


def checkpoint_dir(init: str | Path) -> Path:
    """The checkpoint directory, checked to hold a config.json of a supported model type (TrainingError)."""
    try:
        read_checkpoint_config(str(init))
    except ConfigError as e:
        raise TrainingError("; ".join(e.problems)) from None
    return Path(init).expanduser()


def checkpoint_config(init: str | Path, model_cfg=None):
    """The checkpoint's transformers config (its own class: LlamaConfig, Qwen2Config, ...).

    With model_cfg (the recipe's [model], filled from the same config.json by qtrain.config.recipe), checks that
    transformers reads the shape qtrain.config.recipe read: the estimator and the data code use those keys.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint_dir(init)), local_files_only=True)
    if model_cfg is not None:
        theirs = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                  "num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
                  "kv_heads": config.num_key_value_heads or config.num_attention_heads,
                  "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                  "vocab_size": config.vocab_size, "tie_embeddings": bool(config.tie_word_embeddings)}
        differ = {k: (getattr(model_cfg, k), v) for k, v in theirs.items() if getattr(model_cfg, k) != v}
        if differ:
            raise _error(init, f"transformers reads config.json differently from the recipe's [model] keys "
                               f"(recipe, transformers): {differ}; report this with the config.json")
    return config


def checkpoint_tokenizer(init: str | Path) -> Path:
    """The checkpoint's tokenizer as qtrain.data.tokenizer.load_tokenizer takes it: the directory when it holds a
    tokenizer.json (transformers' AutoTokenizer reads it as is), else its sentencepiece tokenizer.model."""
    path = checkpoint_dir(init)
    if (path / "tokenizer.json").is_file():
        return path
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    raise _error(init, "the directory holds no tokenizer.json or tokenizer.model; copy the model's tokenizer "
                       "files into it, or name one with [data] tokenizer")


def weight_files(init: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists, or model.safetensors."""
    path = checkpoint_dir(init)
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise _error(init, f"{INDEX_FILE} lists shards that are not there: {missing[:3]}; finish the download")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        return [path / name for name in found]
    raise _error(init, "no *.safetensors weights (qtrain reads safetensors only, never pickled .bin files); save "
                       "the model with save_pretrained(..., safe_serialization=True) or download its safetensors")


def checkpoint_problems(init: str | Path) -> list[str]:
    """What keeps a run from starting at [model] init, found before anything is built or written: a missing
    directory or config.json, missing shards, a safetensors file cut short (an interrupted download or copy)."""
    try:
        files = weight_files(init)
    except TrainingError as e:
        return [str(e)]
    return [str(_error(init, problem)) for problem in map(_safetensors_problem, files) if problem]


def _safetensors_problem(file: Path) -> str | None:
    """Why file is not a complete safetensors file, or None: its header (8-byte length, then JSON) must parse
    and the tensors it declares must end where the file does. Reads the header only."""
    size = file.stat().st_size
    fix = "download or copy it again"
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"{file} is {size:,} bytes, shorter than its own header says: the file is incomplete; {fix}"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return f"{file} has no readable safetensors header: it is not a safetensors file, or damaged; {fix}"
    if 8 + n + end != size:
        return (f"{file} is {size:,} bytes but its header declares {8 + n + end:,} bytes of tensors: the file is "
                f"incomplete (an interrupted download or copy?); {fix}")
    return None


@torch.no_grad()
def load_checkpoint_(model: nn.Module, init: str | Path) -> None:
    """Fill an allocated (uninitialised) model with the checkpoint's weights, one tensor at a time.

    Int8Linear projections are quantized from the stored tensor (nearest rounding, as Int8Linear.load_float_),
    every other tensor is copied into its parameter's dtype; both piece by piece (`row_pieces`). Raises
    TrainingError for a tensor of the wrong shape, a tensor the model does not have, or one the model has
    and the checkpoint lacks.
    """
    int8 = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    params = dict(model.named_parameters())  # a tied lm_head is the embedding: named once
    tied = {k for k in model.state_dict() if k not in params and k.endswith(".weight") and k not in int8}
    todo = set(int8) | set(params)
    unexpected, wrong_shape = [], []
    for file in weight_files(init):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        for key, shape in shapes.items():
            if key in int8:
                want = (int8[key].out_features, int8[key].in_features)
            elif key in params:
                want = tuple(params[key].shape)
            else:  # lm_head.weight of a tied model is the embedding, loaded under its own name
                if key not in tied and not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(key)
                continue
            if shape != want:
                wrong_shape.append(f"{key} {shape} (the model's is {want})")
                continue
            # mapped for this tensor alone: its pages leave the process when the file closes, so a shard
            # is never resident as a whole
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if key in int8:
                    _quantize_from(int8[key], f.get_slice(key))
                else:
                    _copy_from(params[key], f.get_slice(key))
            todo.discard(key)
    problems = []
    if wrong_shape:
        problems.append(f"tensors of another shape than config.json implies: {wrong_shape[:3]}")
    if unexpected:
        problems.append(f"tensors the {type(model).__name__} built from config.json does not have: "
                        f"{sorted(unexpected)[:3]} ({len(unexpected)} in all)")
    if todo:
        problems.append(f"tensors missing from the safetensors files: {sorted(todo)[:3]} ({len(todo)} in all)")
    if problems:
        raise _error(init, "; ".join(problems) + "; the weights do not match config.json (a partial download, or "
                                                 "files from two models?)")


@torch.no_grad()
def load_rows_(init: str | Path, int8: dict[str, tuple[Int8Linear, int]], floats: dict[str, tuple[torch.Tensor, int]],
               full_shapes: dict[str, tuple[int, ...]]) -> int:
    """load_checkpoint_ for one rank of a sharded model: only its rows of each tensor are read.

    int8: checkpoint key -> (an Int8Linear over this rank's codes, scales and offsets, its first row);
    floats: key -> (this rank's block of the tensor, its first row); full_shapes: every key's unsharded shape,
    checked against the file. Each file is memory-mapped for one tensor at a time and sliced to the rows
    (safetensors' get_slice), so a rank reads 1/world of the weights. Returns the bytes it read.
    """
    todo, read = set(int8) | set(floats), 0
    for file in weight_files(init):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys() if key in todo}
        for key, shape in shapes.items():
            if shape != full_shapes[key]:
                raise _error(init, f"{key} is {shape} in {file.name}, the model's is {full_shapes[key]}; the "
                                   f"weights do not match config.json")
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if key in int8:
                    layer, first = int8[key]
                    stored = _Rows(f.get_slice(key), first, layer.out_features)
                    _quantize_from(layer, stored)
                else:
                    block, first = floats[key]
                    stored = _Rows(f.get_slice(key), first, block.shape[0] if block.dim() else 1)
                    _copy_from(block, stored)
            read += stored.read
            todo.discard(key)
    if todo:
        raise _error(init, f"tensors missing from the safetensors files: {sorted(todo)[:3]} ({len(todo)} in all)")
    return read


class _Rows:
    """Rows first .. first + count of a safetensors slice, indexed from 0 as a tensor of count rows; counts the
    bytes it hands out."""

    def __init__(self, stored, first: int, count: int):
        self.stored, self.first, self.count, self.read = stored, first, count, 0

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start = 0 if rows.start is None else rows.start
        stop = self.count if rows.stop is None else rows.stop
        t = self.stored[self.first + start : self.first + stop]
        self.read += t.numel() * t.element_size()
        return t


def row_pieces(rows: int, cols: int, rows_per_group_boundary: int = 1) -> list[tuple[int, int]]:
    """Row ranges of at most LOAD_CHUNK_ELEMS elements, each starting on a multiple of rows_per_group_boundary."""
    step = rows_per_group_boundary
    per = max(step, LOAD_CHUNK_ELEMS // max(cols, 1) // step * step)
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def _quantize_from(layer: Int8Linear, stored) -> None:
    """Quantize a stored (out, in) weight into layer, a piece of whole groups at a time.

    Groups are independent, so the codes, scales and offsets equal quantize_groupwise of the whole tensor.
    """
    m, n, g = layer.out_features, layer.in_features, layer.group_size
    for r0, r1 in row_pieces(m, n, g // math.gcd(n, g)):  # r0 * n is a multiple of g: pieces hold whole groups
        w = stored[r0:r1].to(layer.codes.device, torch.float32)
        codes, scale, offset = quantize_groupwise(w, g, layer.scale.dtype)
        g0, g1 = r0 * n // g, r1 * n // g
        layer.codes[r0:r1] = codes
        layer.scale[g0:g1] = scale
        layer.offset[g0:g1] = offset


def _copy_from(p: torch.Tensor, stored) -> None:
    """Copy a stored tensor into p (rounded to p's dtype), row piece by row piece."""
    if p.dim() < 2:
        p.copy_(stored[:])
        return
    cols = p[0].numel()
    for r0, r1 in row_pieces(p.shape[0], cols):
        p[r0:r1].copy_(stored[r0:r1])
