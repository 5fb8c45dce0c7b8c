"""SentencePiece tokenizer: train one on a corpus, load one from disk, check it against [model] vocab_size.

Trained tokenizers follow the LLaMA recipe: byte-pair encoding with byte fallback (any text, including
newlines and characters never seen in training, encodes losslessly as <0xNN> byte pieces), identity
normalization, no whitespace collapsing, digits split. The special ids are fixed:
    unk 0 (<unk>), bos 1 (<s>), eos 2 (</s>), pad 3 (<pad>)
One rule for every tokenizer (docs/tokens.md): a text starts with `document_prefix` (what the tokenizer itself
puts in front of a text; nothing for sentencepiece models, qtrain's own included) and a document ends with EOS;
pretraining documents, fine-tuning examples and sampling prompts alike. PAD never enters training data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from qtrain.core.atomic import write_atomic
from qtrain.errors import DataError
from qtrain.hf.tokenizer import (
    TOKENIZER_JSON,
    HFTokenizer,
    is_hf_tokenizer,
    tokenizer_files,
)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_TRAINING_LINES = 2_000_000  # default [data] tokenizer_sentences: sentencepiece keeps at most this many lines
LINE_CHARS = 4096  # longer lines are cut: sentencepiece silently skips sentences over max_sentence_length bytes

# Everything that decides the trained model; its hash is part of the tokenizer cache key.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    normalization_rule_name="identity",  # keep the text as is (no NFKC), like LLaMA
    remove_extra_whitespaces=False,  # indentation and double spaces survive
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,  # the rarest 0.005% of characters become byte pieces
    input_sentence_size=MAX_TRAINING_LINES,  # replaced by the `sentences` argument of train_tokenizer
    shuffle_input_sentence=True,  # a uniform sample of lines when the input has more; seeded below
    max_sentence_length=4 * LINE_CHARS,  # bytes: a LINE_CHARS line of 4-byte characters still fits
)
TRAINER_SEED = 0


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of every document, cut to LINE_CHARS characters (sentencepiece trains on lines)."""
    for doc in documents:
        for line in doc.splitlines():
            for start in range(0, len(line), LINE_CHARS):
                piece = line[start : start + LINE_CHARS]
                if piece.strip():
                    yield piece


class _Guarded:
    """An iterator that keeps the exception its source raised: sentencepiece turns it into an opaque
    "INTERNAL: ..." RuntimeError, and the data problem (file, line) is what the user needs to see."""

    def __init__(self, source: Iterator[str]):
        self.source, self.error, self.count = source, None, 0

    def __iter__(self) -> _Guarded:
        return self

    def __next__(self) -> str:
        try:
            line = next(self.source)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise
        self.count += 1
        return line


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: Path,
                    sentences: int = MAX_TRAINING_LINES) -> spm.SentencePieceProcessor:
    """Train a BPE sentencepiece model with vocab_size pieces on documents; write it atomically to out_path.

    The documents are cut into lines; sentencepiece keeps a uniform sample of `sentences` of them
    (input_sentence_size with shuffle_input_sentence, seeded) when there are more, so its memory is bounded
    by that number, not by the input. Deterministic for the same documents, vocab_size and sentences.
    Raises DataError, naming [model] vocab_size, when the corpus cannot support that many pieces (or needs more).
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(TRAINER_SEED)  # the line sample (shuffle_input_sentence) is reproducible
    lines = _Guarded(_training_lines(documents))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=min(os.cpu_count() or 1, 16),
            minloglevel=2,  # errors only: sentencepiece logs every step at INFO
            **{**TRAINER_OPTIONS, "input_sentence_size": sentences},
        )
    except RuntimeError as e:
        if lines.error is not None:  # the data failed (a bad record, a damaged file): that is the problem to report
            raise lines.error from None
        if lines.count == 0:
            raise DataError("the tokenizer's training sample is empty: the training documents hold no text (empty "
                            "after stripping whitespace, or every document held out); add text to [data] corpus, or "
                            "give a trained tokenizer in [data] tokenizer") from None
        raise _vocab_error(str(e), vocab_size) from None
    write_atomic(Path(out_path), [model.getvalue()])
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _vocab_error(message: str, vocab_size: int) -> DataError:
    """Translate sentencepiece's vocabulary-size failures into the recipe key to change."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return DataError(
            f"the corpus is too small for [model] vocab_size = {vocab_size}: sentencepiece can build at most "
            f"{too_high.group(2)} pieces from it; lower model.vocab_size to <= {too_high.group(2)} or provide more text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return DataError(
            f"[model] vocab_size = {vocab_size} is too small: this corpus needs {too_low.group(2)} pieces for its "
            f"special tokens and characters (byte fallback adds 256 more); raise model.vocab_size"
        )
    return DataError(f"sentencepiece training failed with [model] vocab_size = {vocab_size}: {message}")


def trainer_fingerprint(sentences: int = MAX_TRAINING_LINES) -> str:
    """A short stable hash of the training options, for cache keys."""
    blob = json.dumps({**TRAINER_OPTIONS, "input_sentence_size": sentences, "seed": TRAINER_SEED}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def load_tokenizer(path: str | Path):
    """A sentencepiece .model file, a tokenizer.json, or a Hugging Face tokenizer directory (local files only).

    Returns an object with the sentencepiece calls qtrain uses (encode, decode, bos_id, eos_id, get_piece_size).
    Raises DataError naming [data] tokenizer when it cannot.
    """
    path = Path(path).expanduser()
    if is_hf_tokenizer(path):
        return HFTokenizer(path)
    if not path.is_file():
        raise DataError(f'[data] tokenizer = "{path}": no such file; give a sentencepiece .model file, a '
                        f'tokenizer.json, a Hugging Face tokenizer directory, or "" to train one on the corpus')
    try:
        tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f'[data] tokenizer = "{path}" is not a sentencepiece model ({e})') from None
    if tokenizer.eos_id() < 0:
        raise DataError(f'[data] tokenizer = "{path}" has no EOS piece; qtrain separates documents with EOS, '
                        f'so use a tokenizer that defines one')
    return tokenizer


def document_prefix(tokenizer) -> list[int]:
    """The ids every pretraining document, prompt/completion example and sampling prompt starts with: those a
    Hugging Face tokenizer puts in front of a text itself (HFTokenizer.prefix_ids: its BOS when add_bos_token
    or its post-processor adds one, as transformers' `tok(text)` does), none for a sentencepiece model (whose
    encode adds none; qtrain's own tokenizers are exported with add_bos_token = false to match). A chat
    example is its template's rendering as it is: the template writes any BOS it wants."""
    return tokenizer.prefix_ids() if isinstance(tokenizer, HFTokenizer) else []


def boundary_note(tokenizer) -> str:
    """How documents start and end under this tokenizer, for the run header."""
    def piece(i: int) -> str:
        return f"{tokenizer.id_to_piece(i)!r} (id {i})"  # decode() drops sentencepiece's control pieces

    prefix = document_prefix(tokenizer)
    start = ("start with " + " ".join(piece(i) for i in prefix) + " (the tokenizer's BOS)" if prefix
             else "start with no BOS (the tokenizer adds none)")
    return f"documents, examples and sampling prompts {start}; a document ends with EOS {piece(tokenizer.eos_id())}"


def tokenizer_sha256(path: str | Path) -> str:
    """sha256 of the files that define a tokenizer (name and bytes of each, in order): its identity."""
    path = Path(path).expanduser()
    files = tokenizer_files(path) if is_hf_tokenizer(path) and path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(f.name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


RUN_TOKENIZER_MODEL = "tokenizer.model"  # a sentencepiece model, in a run directory
RUN_TOKENIZER_DIR = "tokenizer"  # a Hugging Face tokenizer's files, in a run directory


def save_run_tokenizer(path: str | Path, run_dir: Path) -> Path:
    """Copy the tokenizer at path into run_dir (atomically, file by file); returns its path in the run."""
    path = Path(path).expanduser()
    if is_hf_tokenizer(path):
        files = tokenizer_files(path)
        out = Path(run_dir) / RUN_TOKENIZER_DIR
        for f in files:
            write_atomic(out / (TOKENIZER_JSON if f.suffix == ".json" and path.is_file() else f.name), f.read_bytes())
        return out
    out = Path(run_dir) / RUN_TOKENIZER_MODEL
    write_atomic(out, path.read_bytes())
    return out


def run_tokenizer_path(run_dir: Path) -> Path | None:
    """The tokenizer a run trained with (its own copy), or None if the run directory holds none."""
    for name in (RUN_TOKENIZER_DIR, RUN_TOKENIZER_MODEL):
        if (Path(run_dir) / name).exists():
            return Path(run_dir) / name
    return None


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raise DataError unless the tokenizer has exactly [model] vocab_size pieces."""
    n = tokenizer.get_piece_size()
    if n != model_vocab_size:
        raise DataError(
            f"the tokenizer ([data] tokenizer) has {n} pieces but [model] vocab_size = {model_vocab_size}; "
            f"set model.vocab_size = {n}, or use a tokenizer with {model_vocab_size} pieces"
        )
