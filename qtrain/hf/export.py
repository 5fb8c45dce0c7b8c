"""Hugging Face export: a float model + its tokenizer -> a directory transformers loads alone.

The model is a plain transformers model of a family qtrain trains (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM): its config, model_type included, is written as it is. A run that started
from a Hugging Face checkpoint ([model] init) has that checkpoint's tokenizer files in its run directory:
they are copied as they are. A run with qtrain's own sentencepiece tokenizer gets it converted, as follows.

The output loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`
without qtrain, sentencepiece or protobuf installed: the weights are model.safetensors, the tokenizer is a
`tokenizers` serialization (tokenizer.json) converted here from the .model file, and tokenizer.model is copied
beside it for tools that want the sentencepiece original (llama.cpp, sentencepiece users).

Why not transformers' own converter: in transformers 5 `LlamaTokenizer` is a BPE-only tokenizers backend that
rebuilds itself from vocab + merges on load, which mangles a unigram model, and converting any .model file needs
protobuf, which qtrain does not depend on. So this module reads the few sentencepiece settings that decide
segmentation straight from the ModelProto wire format, rebuilds the same pipeline in `tokenizers`, and refuses
to export unless the result reproduces sentencepiece's ids on a probe set (_PROBES).
Dequantizing qtrain's int8 layers into a float Llama is a separate step that runs before this one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from qtrain.config.recipe import FAMILIES
from qtrain.core.atomic import fsync_path, replace_dir
from qtrain.errors import DataError, ExportError
from qtrain.hf.tokenizer import HFTokenizer, is_hf_tokenizer, tokenizer_files

EXPORT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPACE = "\u2581"  # "▁", sentencepiece's visible whitespace

# Text the converted tokenizer must split exactly as sentencepiece does before export_hf writes anything:
# plain prose, code, digits, runs of spaces, leading/trailing whitespace, tabs and newlines, accents (byte
# fallback), NFKC-folded characters (ligature, full width, circled digit), CJK and an emoji (4-byte UTF-8).
_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # squared",
    "Version 3.11.7 was released on 2023-12-04; 1,234,567 downloads.",
    "  leading,   inner    and trailing spaces   ",
    "naïve café, Ærøskøbing, São Paulo",
    "ﬁne ＡＢＣ ① ½ Ⅻ",
    "東京は日本の首都です。🤖!",
)



# --- sentencepiece model -> tokenizers.Tokenizer -----------------------------------------------------------------


def _proto_fields(buf: bytes) -> dict[int, list]:
    """One protobuf message as {field number: [values]}: ints for varints, bytes for everything else.

    Just enough of the wire format (https://protobuf.dev/programming-guides/encoding/) to read a few
    sentencepiece settings without depending on protobuf.
    """
    fields: dict[int, list] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:  # varint
            value = varint()
        elif wire_type == 2:  # length-delimited: string, bytes, sub-message
            n = varint()
            value, i = buf[i : i + n], i + n
        elif wire_type in (1, 5):  # fixed 64 / 32 bit
            n = 8 if wire_type == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ExportError(
                f"unexpected protobuf wire type {wire_type} for field {number}: not a sentencepiece .model file?"
            )
        fields.setdefault(number, []).append(value)
    return fields


def _spm_settings(model_bytes: bytes) -> dict:
    """The sentencepiece settings that decide segmentation (field numbers from sentencepiece_model.proto)."""
    proto = _proto_fields(model_bytes)
    trainer = _proto_fields(proto.get(2, [b""])[-1])  # ModelProto.trainer_spec = 2
    normalizer = _proto_fields(proto.get(3, [b""])[-1])  # ModelProto.normalizer_spec = 3
    return {
        "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(trainer.get(3, [1])[-1], "unknown"),
        "byte_fallback": bool(trainer.get(35, [0])[-1]),
        "precompiled_charsmap": normalizer.get(2, [b""])[-1],  # the compiled NFKC (or custom) rules
        "add_dummy_prefix": bool(normalizer.get(3, [1])[-1]),
        "remove_extra_whitespaces": bool(normalizer.get(4, [1])[-1]),
    }


def _backend_tokenizer(sp: spm.SentencePieceProcessor, settings: dict) -> Tokenizer:
    """A tokenizers.Tokenizer that segments like sp: same pieces, scores, normalization and byte fallback."""
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if settings["model_type"] == "unigram":
        # same pieces and log-probabilities, so the Viterbi search picks the same segmentation
        model = models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=settings["byte_fallback"])
    elif settings["model_type"] == "bpe":
        # sentencepiece BPE merges the pair whose result scores best; pieces are stored best-first, so
        # ranking each merge by the id of the piece it produces (what generate_merges does) is the same order
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = generate_merges(vocab)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                           byte_fallback=settings["byte_fallback"])
    else:
        raise ExportError(f"sentencepiece model_type={settings['model_type']} is not supported; "
                          "train the tokenizer with model_type=unigram or model_type=bpe")
    tokenizer = Tokenizer(model)

    # sentencepiece normalizes in this order: charsmap rules, whitespace squeeze, dummy prefix, space -> "▁".
    # \A and \z (not ^ and $, which match at every line in Oniguruma) so only the ends of the text are stripped.
    steps = []
    if settings["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(settings["precompiled_charsmap"]))
    if settings["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if settings["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)

    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if settings["add_dummy_prefix"]:
        decode.append(decoders.Strip(content=" ", left=1, right=0))  # drop the dummy prefix again
    tokenizer.decoder = decoders.Sequence(decode)
    return tokenizer


def hf_tokenizer(tokenizer_model: Path, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """The transformers tokenizer for our sentencepiece .model file: same ids, no BOS prepended, no EOS appended.

    unk/bos/eos/pad tokens and ids are the sentencepiece model's own (qtrain's convention: 0, 1, 2, 3).
    Raises ExportError if the conversion does not reproduce sentencepiece's ids on the probe texts.
    Known limit: where two unigram segmentations score exactly the same (e.g. a long run of one character),
    the two libraries may break the tie differently; that needs a tokenizer trained without byte_fallback or
    on repetitive text to show up (qtrain trains with byte_fallback=true).
    """
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise ExportError(f"tokenizer model {tokenizer_model} does not exist; pass the sentencepiece .model file")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    backend = _backend_tokenizer(sp, _spm_settings(tokenizer_model.read_bytes()))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None  # id -1: the model has no such token

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=piece(sp.unk_id()),
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()),
        add_bos_token=False,  # `tok(text)` = sentencepiece's encode, as qtrain trains (qtrain.data.tokenizer.document_prefix)
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
    for text in _PROBES:
        want, got = sp.encode(text), tokenizer.encode(text, add_special_tokens=False)
        if want != got:
            raise ExportError(
                f"the converted tokenizer splits {text!r} into {got}, sentencepiece into {want}; {tokenizer_model} "
                "uses a setting this converter does not reproduce (user-defined symbols, split_digits, "
                "treat_whitespace_as_suffix, escape_whitespaces=false, ...); retrain it with defaults"
            )
    return tokenizer


# --- model ------------------------------------------------------------------------------------------------------


def _export_config(model: PreTrainedModel, dtype: torch.dtype, special_ids: dict[str, int | None]):
    """A copy of model's config as config.json should say it: the export dtype and the tokenizer's special ids."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # written to config.json; from_pretrained(dtype="auto") loads in this dtype
    for name, token_id in special_ids.items():  # generation stops on the tokenizer's eos, pads with its pad
        setattr(config, name, token_id)
    return config


def _cast_copy(model: PreTrainedModel, config) -> PreTrainedModel:
    """A CPU copy of model with every weight cast to config.dtype; the caller's model and devices are untouched.

    Built on the meta device and filled by assignment, so peak memory is one CPU copy in dtype (no deepcopy on GPU).
    """
    with torch.device("meta"):
        out = type(model)(config)
    state = {name: t.detach().to("cpu", config.dtype, copy=True) for name, t in model.state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        out.tie_weights()  # assignment loaded embed and lm_head as two copies; make them one parameter again
    return out


@contextlib.contextmanager
def _saveable(model: PreTrainedModel, config):
    """The model to save_pretrained with config: model itself, its config swapped in for the save, when every
    tensor already is a CPU tensor of the export dtype (what qtrain.model.builder.dequantized_copy returns: so
    an export holds one float copy of the model, not two); else a CPU copy cast to that dtype (_cast_copy)."""
    tensors = list(model.state_dict().values())
    if not all(t.device.type == "cpu" and t.dtype == config.dtype for t in tensors):
        yield _cast_copy(model, config)
        return
    from transformers import GenerationConfig

    kept = model.config, model.generation_config
    model.config, model.generation_config = config, GenerationConfig.from_model_config(config)
    try:
        yield model
    finally:
        model.config, model.generation_config = kept


def _name_portable_tokenizer_class(config_path: Path) -> None:
    """Set tokenizer_class in tokenizer_config.json to a name every transformers version reads."""
    # transformers 5 writes its class name "TokenizersBackend", which 4.x does not know; "PreTrainedTokenizerFast"
    # means "use tokenizer.json as is" in both, so the export also loads where transformers 4.x is pinned
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_hf(
    model: PreTrainedModel,
    tokenizer_model: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write model (weights cast to dtype) and tokenizer as a Hugging Face directory at out_dir; return out_dir.

    tokenizer_model: qtrain's sentencepiece .model (converted to tokenizer.json, its special ids written into
    the config), or a Hugging Face tokenizer directory (its files copied as they are, the model's config and
    special ids kept) or tokenizer.json.
    The directory is built beside out_dir (.tmp-<name>-<pid>) and renamed into place, so out_dir is either
    absent/old or complete. A non-empty out_dir is replaced only with overwrite=True.
    Raises ExportError for a non-float model, a dtype other than EXPORT_DTYPES, or a vocab smaller than the tokenizer's.
    """
    if not (isinstance(model, PreTrainedModel) and getattr(model.config, "model_type", None) in FAMILIES):
        raise ExportError(f"export_hf takes a transformers model of a family qtrain trains ({', '.join(FAMILIES)}), "
                          f"got {type(model).__name__}; dequantize the qtrain model into a float model first "
                          f"(qtrain.model.builder.dequantized_copy)")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype} cannot be exported; choose one of {[str(d) for d in EXPORT_DTYPES]}")
    not_float = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
    if not_float:
        raise ExportError(f"model has non-float tensors {not_float[:3]} ({len(not_float)} in all); "
                          "dequantize the int8 layers into float weights before exporting")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"out_dir {out_dir} is a file; choose a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"out_dir {out_dir} exists and is not empty; pass overwrite=True to replace it "
                          "or choose a new directory")

    # the tokenizer first: a conversion problem fails the export before any weights are copied
    tokenizer_model = Path(tokenizer_model)
    copied = is_hf_tokenizer(tokenizer_model)
    if copied:  # a checkpoint's tokenizer: its files as they are; the checkpoint's config keeps its special ids
        try:
            tokenizer = HFTokenizer(tokenizer_model).hf
        except DataError as e:
            raise ExportError(str(e)) from None
        special_ids = {}
    else:
        tokenizer = hf_tokenizer(tokenizer_model, model_max_length=model.config.max_position_embeddings)
        special_ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    if model.config.vocab_size < len(tokenizer):
        raise ExportError(f"model vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} pieces; set [model] vocab_size >= {len(tokenizer)}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with _saveable(model, _export_config(model, dtype, special_ids)) as plain:
            plain.save_pretrained(tmp)
        if copied and tokenizer_model.is_dir():
            for f in tokenizer_files(tokenizer_model):
                shutil.copyfile(f, tmp / f.name)
        else:  # converted from sentencepiece, or a bare tokenizer.json: written with its tokenizer_config.json
            tokenizer.save_pretrained(tmp)
            _name_portable_tokenizer_class(tmp / "tokenizer_config.json")
        if not copied:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for path in tmp.iterdir():
            path.chmod(mode)  # safetensors writes model.safetensors owner-only (0600); one mode for every file
            fsync_path(path)
        fsync_path(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
