"""Token data: corpus -> cached tokenizer -> cached memory-mapped token file -> (x, y) batches.

Cache layout under `DataConfig.cache_root()` (cache_dir, else $QTRAIN_CACHE, else ~/.cache/qtrain):
    corpus/default-py<X.Y.Z>-v<N>.jsonl           the default corpus, extracted at first use
    tokenizers/<corpus sha>-v<vocab>-<opts>.model  trained tokenizer (sha256 of the corpus text used)
    tokens/<corpus sha>-<tokenizer sha>.<dtype>.bin  every document's ids then EOS, concatenated
Hashes are the first 16 hex digits of sha256. Every file is written atomically (temp file, fsync,
os.replace), so an interrupted run never leaves a truncated cache entry. The token file holds raw
uint16 ids (uint32 when vocab_size > 65536); its length in tokens is its size / itemsize.
The last val_fraction of the tokens is the validation split (not aligned to documents).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from qtrain.config import DataConfig
from qtrain.atomic import write_atomic
from qtrain.corpus import iter_documents
from qtrain.errors import DataError
from qtrain.tokenizer import (check_vocab, load_tokenizer, save_run_tokenizer, tokenizer_sha256, train_tokenizer,
                              trainer_fingerprint)

ENCODE_BATCH_CHARS = 4_000_000  # documents are tokenized in batches of about this many characters


@dataclass
class Dataset:
    """Tokenized corpus: train and val splits as read-only memmaps, plus the tokenizer."""

    train: np.ndarray  # (N_train,) uint16/uint32 memmap
    val: np.ndarray  # (N_val,) the last val_fraction of the same file
    tokenizer: spm.SentencePieceProcessor
    tokenizer_path: Path  # the cached or user-given .model file
    token_path: Path
    corpus_sha256: str
    tokenizer_sha256: str

    def identity(self) -> dict[str, str]:
        """What a checkpoint records of its data: a resume or an eval on other data can say so."""
        return {"corpus": self.corpus_sha256, "tokenizer": self.tokenizer_sha256}

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> TokenSampler:
        return TokenSampler(self.train, batch_size, seq_len, seed)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        return val_batches(self.val, n_batches, batch_size, seq_len)


def prepare_data(data_cfg: DataConfig, vocab_size: int, seq_len: int, run_dir: Path | None = None) -> Dataset:
    """Load the corpus, train or load the tokenizer, tokenize once (cached), split, and check lengths.

    vocab_size is [model] vocab_size and seq_len is [train] seq_len. With run_dir, the tokenizer is
    copied to run_dir/tokenizer.model so a run directory is self-contained. Raises DataError.
    """
    root = data_cfg.cache_root()

    def documents() -> Iterator[str]:  # a fresh pass over the corpus each call
        return iter_documents(data_cfg.corpus, root, data_cfg.max_corpus_chars)

    corpus_sha = _corpus_sha256(documents())
    tokenizer_path = _tokenizer_file(data_cfg, documents, corpus_sha, vocab_size, root)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, vocab_size)
    tokenizer_sha = tokenizer_sha256(tokenizer_path)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    token_path = root / "tokens" / f"{corpus_sha[:16]}-{tokenizer_sha[:16]}.{dtype.name}.bin"
    if not token_path.exists():
        write_atomic(token_path, _encode(documents(), tokenizer, dtype))
    tokens = np.memmap(token_path, dtype=dtype, mode="r")  # (N,) nothing is read until indexed

    n = len(tokens)
    n_val = int(n * data_cfg.val_fraction)
    need = seq_len + 1  # one window: seq_len inputs and the token after the last as its target
    for split, size in (("validation", n_val), ("training", n - n_val)):
        if size < need:
            raise DataError(
                f"corpus has {n} tokens; the {split} split gets {size} of them ([data] val_fraction = "
                f"{data_cfg.val_fraction}) but needs at least seq_len+1 = {need}; provide more text or "
                f"lower train.seq_len"
            )
    if run_dir is not None:
        save_run_tokenizer(tokenizer_path, run_dir)
    return Dataset(tokens[: n - n_val], tokens[n - n_val :], tokenizer, tokenizer_path, token_path, corpus_sha,
                   tokenizer_sha)


def _corpus_sha256(documents: Iterable[str]) -> str:
    """sha256 of the documents as used (after stripping and truncation), length-prefixed: unambiguous."""
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _tokenizer_file(data_cfg: DataConfig, documents: Callable[[], Iterator[str]], corpus_sha: str,
                    vocab_size: int, root: Path) -> Path:
    """The user's tokenizer, or the one trained on this corpus (trained now unless cached)."""
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer).expanduser()
    path = root / "tokenizers" / f"{corpus_sha[:16]}-v{vocab_size}-{trainer_fingerprint()}.model"
    if not path.exists():
        train_tokenizer(documents(), vocab_size, path)
    return path


def _encode(documents: Iterable[str], tokenizer: spm.SentencePieceProcessor, dtype: np.dtype) -> Iterator[bytes]:
    """Token ids of each document followed by EOS, as raw bytes of `dtype`, in batches.

    A document is encoded whole (one sentencepiece call): split a huge single-file corpus into several
    files or JSONL lines to bound memory.
    """
    eos = tokenizer.eos_id()

    def encode(batch: list[str]) -> bytes:
        ids = tokenizer.encode(batch, num_threads=-1)  # list of B id lists, encoded in parallel
        return np.concatenate([np.asarray(doc + [eos], dtype=dtype) for doc in ids]).tobytes()

    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= ENCODE_BATCH_CHARS:
            yield encode(batch)
            batch, chars = [], 0
    if batch:
        yield encode(batch)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """x = tokens[s : s+T], y = tokens[s+1 : s+T+1] for each start s, as int64 (B, T) tensors."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # (B, T+1): one copy out of the memmap
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)


class TokenSampler:
    """Random training windows. Batch k's offsets are a pure function of (seed, k): resume is exact and O(1).

    Offsets are uniform over every start that leaves room for the target token; windows may overlap and
    cross document boundaries (EOS marks them). state_dict() stores seed and batches drawn; a state only
    loads into a sampler with the same seed, batch shape and token count.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        assert len(tokens) >= seq_len + 1, f"{len(tokens)} tokens cannot hold one window of seq_len+1 = {seq_len + 1}"
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.batches_drawn = 0

    def offsets(self, k: int) -> np.ndarray:
        """Start positions (B,) of batch k, from a generator seeded by (seed, k) alone."""
        rng = np.random.Generator(np.random.PCG64([self.seed, k]))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # s + T <= N - 1

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), int64 (B, T) each, with y[:, t] = x[:, t+1] and y[:, -1] the token after the window."""
        starts = self.offsets(self.batches_drawn)
        self.batches_drawn += 1
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        keys = {"seed": "train.seed", "batch_size": "train.batch_size", "seq_len": "train.seq_len",
                "num_tokens": "the corpus and tokenizer"}
        for key, what in keys.items():
            if state[key] != mine[key]:
                raise DataError(f"sampler state was saved with {key} = {state[key]} but this run has {mine[key]}; "
                                f"resume with the same {what}, or start a fresh run")
        self.batches_drawn = int(state["batches_drawn"])


def val_batches(tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Up to n_batches batches of consecutive non-overlapping windows from the start of `tokens`.

    Window i has inputs tokens[i*T : (i+1)*T] and targets shifted by one. Always the same windows;
    when the split holds fewer than n_batches * batch_size windows, all of them are used and the last
    batch may be smaller.
    """
    n_windows = min(n_batches * batch_size, (len(tokens) - 1) // seq_len)
    starts = np.arange(n_windows) * seq_len  # (n_windows,)
    for i in range(0, n_windows, batch_size):
        yield _windows(tokens, starts[i : i + batch_size], seq_len)
