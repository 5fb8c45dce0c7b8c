"""How a source's validation split is formed, decided before any tokenizer is trained: whole documents or the tail.

Whole held-out documents (the rule of qtrain.data.sources) need a source of many documents. A book in one
.txt file, or a dump without blank lines, is one or a few documents: none, or all of them, would be held out.
So each source is first scanned, without a tokenizer, over at most SCAN_CHARS characters of its documents:
    "documents"  the scan met held-out documents of at least CHARS_PER_TOKEN x (seq_len + 1) characters, and
                 as many training characters: validation holds out whole documents, as before;
    "tail"       it did not: the source is tokenized whole into the training split, and its validation split
                 is the last val_fraction of that token stream (at least one window of seq_len + 1 tokens),
                 cut when the shards are opened (split_tail).
The same scan refuses, before anything is tokenized, a source whose whole text cannot hold one training and
one validation window (a token covers at least one UTF-8 byte, so a source has at most bytes + documents
tokens). The plan is a pure function of the source's fingerprint, val_fraction, seq_len and max_corpus_chars,
and is cached under that key: a later start reads no corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qtrain.core.atomic import write_atomic
from qtrain.data.loader import TokenStream
from qtrain.data.sources import DocumentStream, Source
from qtrain.errors import DataError

PLAN_FORMAT = 1
SCAN_CHARS = 32 << 20  # characters of a source's documents read, at most, to decide
CHARS_PER_TOKEN = 8  # a generous bound on the mean characters per token of a subword tokenizer (English: ~4)
DOCUMENTS, TAIL = "documents", "tail"


@dataclass(frozen=True)
class Holdout:
    """The plan of one source's validation split and what the scan saw."""

    mode: str  # DOCUMENTS | TAIL
    docs: int  # documents seen by the scan
    val_docs: int  # of which held out by the whole-document rule
    chars: int  # characters seen
    complete: bool  # the scan read the whole source (else it stopped after SCAN_CHARS or once decided)
    text_chars: float  # the source's characters: exact when complete, else estimated from the bytes read

    @property
    def tail(self) -> bool:
        return self.mode == TAIL

    def sample_stop(self, fraction: float) -> int:
        """Characters from the source's start the tokenizer sample may read (0 = no limit): in tail mode it
        stops well before the held-out tail (2 x val_fraction from the end of the estimated text)."""
        return max(1, math.floor((1 - 2 * fraction) * self.text_chars)) if self.tail else 0


def plan_holdout(source: Source, fingerprint: str, fraction: float, seq_len: int, max_chars: int,
                 cache_root: Path) -> Holdout:
    """The validation plan of a training source (see the module docstring); cached. Raises DataError when the
    source is too small for one training and one validation window."""
    key = hashlib.sha256(json.dumps({"format": PLAN_FORMAT, "source": fingerprint, "fraction": fraction,
                                     "seq_len": seq_len, "max_chars": max_chars}, sort_keys=True).encode()).hexdigest()
    path = Path(cache_root) / "holdout" / f"{key[:24]}.json"
    if path.is_file():
        try:
            return Holdout(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # a torn or older file: scan again
    plan = _scan(source, fraction, seq_len, max_chars)
    write_atomic(path, json.dumps(asdict(plan)).encode())
    return plan


def _scan(source: Source, fraction: float, seq_len: int, max_chars: int) -> Holdout:
    need = seq_len + 1
    enough = CHARS_PER_TOKEN * need
    stream = DocumentStream(source, val_fraction=fraction, max_chars=max_chars)
    docs = val_docs = chars = val_chars = utf8 = 0
    complete = True
    items = iter(stream)
    for text, last, val in items:
        n = len(text)
        chars += n
        utf8 += len(text.encode("utf-8", errors="ignore"))
        docs += last
        if val:
            val_chars += n
            val_docs += last
        if val_docs and val_chars >= enough and chars - val_chars >= enough:
            complete = False  # decided: whole documents
            break
        if chars >= SCAN_CHARS:
            complete = False
            break
    items.close()
    mode = DOCUMENTS if val_docs and val_chars >= enough and chars - val_chars >= enough else TAIL
    if complete and chars == 0:
        raise DataError(f'{source.key} = "{source.spec}" contains no text (empty after stripping whitespace); '
                        f'add text to it or point {source.key} elsewhere')
    if complete and utf8 + docs < 2 * need:
        raise DataError(f'{source.key} = "{source.spec}" holds {chars:,} characters ({utf8:,} bytes of text in '
                        f'{docs:,} documents): at most {utf8 + docs:,} tokens, fewer than the 2 x (seq_len+1) = '
                        f'{2 * need:,} that one training and one validation window need; provide more text, give a '
                        f'separate [data] validation source, or lower train.seq_len')
    read = stream.raw_bytes()
    estimate = chars if complete else chars * max(source.total_bytes, 1) / max(read, 1)
    return Holdout(mode, docs, val_docs, chars, complete, float(estimate))


def check_validation_source(source: Source, seq_len: int, max_chars: int) -> None:
    """Refuse a separate validation source too small for one window, before anything is tokenized (reads at
    most the bytes that window needs)."""
    need, utf8, docs = seq_len + 1, 0, 0
    for text, last, _ in DocumentStream(source, max_chars=max_chars):
        utf8 += len(text.encode("utf-8", errors="ignore"))
        docs += last
        if utf8 + docs >= need:
            return
    raise DataError(f'[data] validation = "{source.spec}" holds {utf8:,} bytes of text in {docs:,} documents: at '
                    f'most {utf8 + docs:,} tokens, fewer than one window of seq_len+1 = {need:,}; give a larger '
                    f'validation source or lower train.seq_len')


def tail_tokens(n_tokens: int, fraction: float, seq_len: int) -> int:
    """Tokens held out at the end of a tail-mode source of n_tokens: val_fraction of them, at least one window."""
    return max(math.ceil(fraction * n_tokens), seq_len + 1)


def split_tail(stream: TokenStream, held: int) -> tuple[TokenStream, TokenStream]:
    """(the first len - held tokens, the last held) of a stream, as views of its shards: nothing is read."""
    cut = len(stream) - held
    head, tail, start = [], [], 0
    for part in stream.parts:
        end = start + len(part)
        if end <= cut:
            head.append(part)
        elif start >= cut:
            tail.append(part)
        else:
            head.append(part[: cut - start])
            tail.append(part[cut - start :])
        start = end
    empty = [np.empty(0, dtype=stream.dtype)]
    return TokenStream(head or empty), TokenStream(tail or empty)
