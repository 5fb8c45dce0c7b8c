"""Token shards on disk: a directory per (source, tokenizer), written in order, resumable, read memory-mapped.

Layout of one shard directory:
    train-00000.bin         the training documents' token ids, each document followed by EOS, raw uint16
                            (uint32 when the vocabulary exceeds 65536), in corpus order
    train-00000.docs.npy    int64 end offset (exclusive, after the EOS) of every document ending in the shard
    val-00000.bin / .docs.npy   the same for the held-out validation documents of the same stretch of corpus
    index.json              the closed shards: token and document counts, and the corpus position each one
                            ends at; "complete": true once the whole source is tokenized
A shard is closed at a unit boundary once it holds at least `shard_tokens` training tokens: its files are
fsynced and renamed into place, then index.json is rewritten atomically. A killed writer therefore leaves
only closed shards (plus `*.partial` files, deleted on the next start), and the next start continues from
the position recorded for the last closed shard. A document longer than a unit can span two shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtrain.core.atomic import fsync_path, remove_scratch, write_atomic
from qtrain.errors import DataError

SHARD_FORMAT = 1
INDEX_FILE = "index.json"
SHARD_TOKENS = 1 << 27  # training tokens per shard (256 MiB of uint16): the granularity of a resumed prepare


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:05d}"


@dataclass
class Encoded:
    """One unit of documents, tokenized: what a worker returns and the writer appends."""

    train: np.ndarray  # (N,) token ids of the training documents (EOS after each complete one)
    train_ends: np.ndarray  # (D,) int64 end offsets of the training documents completed in this unit
    val: np.ndarray
    val_ends: np.ndarray
    chars: int  # characters of text encoded
    docs: int  # documents completed (train + val)


class ShardWriter:
    """Appends encoded units to the open shard of `directory`; see the module docstring."""

    def __init__(self, directory: Path, dtype: np.dtype, meta: dict, shard_tokens: int = SHARD_TOKENS):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        index_path = self.dir / INDEX_FILE
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            if self.index.get("format") != SHARD_FORMAT or self.index.get("dtype") != self.dtype.name:
                raise DataError(f"{self.dir} holds shards of another format; delete the directory and run "
                                f"`qtrain prepare` again")
        else:
            self.index = {"format": SHARD_FORMAT, "dtype": self.dtype.name, "meta": meta, "shards": [],
                          "complete": False}
        self._files: dict = {}
        if self.complete:
            return
        for p in self.dir.glob("*.partial"):  # the open shard of a killed writer
            p.unlink()
        remove_scratch(self.dir)
        self._open()

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def resume_point(self) -> dict | None:
        """The position the last closed shard ends at (None: start from the beginning)."""
        shards = self.index["shards"]
        return shards[-1]["end"] if shards else None

    def totals(self) -> dict:
        keys = ("train_tokens", "val_tokens", "train_docs", "val_docs", "chars", "raw_bytes")
        out = {k: sum(s[k] for s in self.index["shards"]) for k in keys[:-1]}
        out["raw_bytes"] = self.index["shards"][-1]["raw_bytes"] if self.index["shards"] else 0
        return out

    def _open(self) -> None:
        n = len(self.index["shards"])
        self._files = {split: open(self.dir / f"{shard_name(split, n)}.bin.partial", "wb") for split in ("train", "val")}
        self._ends = {"train": [], "val": []}
        self._tokens = {"train": 0, "val": 0}
        self._chars = 0
        self._docs = {"train": 0, "val": 0}

    def append(self, unit: Encoded, end: dict, raw_bytes: int) -> None:
        """Add one unit; `end` is the corpus position after it, raw_bytes the input read so far."""
        for split, tokens, ends in (("train", unit.train, unit.train_ends), ("val", unit.val, unit.val_ends)):
            self._files[split].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self._ends[split].append(ends + self._tokens[split])
            self._tokens[split] += len(tokens)
            self._docs[split] += len(ends)
        self._chars += unit.chars
        if self._tokens["train"] >= self.shard_tokens:
            self._close_shard(end, raw_bytes)
            self._open()

    def _close_shard(self, end: dict, raw_bytes: int) -> None:
        n = len(self.index["shards"])
        for split in ("train", "val"):
            f = self._files[split]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            ends = np.concatenate(self._ends[split]) if self._ends[split] else np.empty(0, np.int64)
            buf = _npy_bytes(ends.astype(np.int64))
            write_atomic(self.dir / f"{shard_name(split, n)}.docs.npy", buf)
            os.replace(self.dir / f"{shard_name(split, n)}.bin.partial", self.dir / f"{shard_name(split, n)}.bin")
        fsync_path(self.dir)
        self.index["shards"].append({
            "train_tokens": self._tokens["train"], "val_tokens": self._tokens["val"],
            "train_docs": self._docs["train"], "val_docs": self._docs["val"], "chars": self._chars,
            "raw_bytes": raw_bytes, "end": end,
        })
        self._write_index()

    def finish(self, end: dict, raw_bytes: int) -> None:
        """Close the last shard (if it holds anything) and mark the directory complete."""
        if self._tokens["train"] or self._tokens["val"] or not self.index["shards"]:
            self._close_shard(end, raw_bytes)
        else:  # nothing in the open shard: abandon it, as close() does
            self.close()
        self.index["complete"] = True
        self._write_index()

    def close(self) -> None:
        """Abandon the open shard (an error or interrupt): closed shards stay, the partial files go."""
        for split, f in self._files.items():
            f.close()
            if not self.complete:
                (self.dir / f"{shard_name(split, len(self.index['shards']))}.bin.partial").unlink(missing_ok=True)

    def _write_index(self) -> None:
        write_atomic(self.dir / INDEX_FILE, json.dumps(self.index, indent=1).encode())


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def is_complete(directory: Path) -> bool:
    return _complete_index(directory) is not None


def _complete_index(directory: Path) -> dict | None:
    """The directory's index.json when it marks the shards complete, else None (missing, torn, unfinished)."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except ValueError:
        return None
    return index if index.get("complete") else None


class ShardSet:
    """A complete shard directory opened read-only: memmaps of every shard, their document ends, the counts."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        index = _complete_index(self.dir)  # read once
        if index is None:
            raise DataError(f"{self.dir} holds no complete set of token shards; run `qtrain prepare` with the "
                            f"recipe to (re)build it")
        self.index = index
        self.dtype = np.dtype(self.index["dtype"])
        self.meta = self.index.get("meta", {})
        self.train = [self._map("train", i, s["train_tokens"]) for i, s in enumerate(self.index["shards"])]
        self.val = [self._map("val", i, s["val_tokens"]) for i, s in enumerate(self.index["shards"])]

    def _map(self, split: str, n: int, tokens: int) -> np.ndarray:
        path = self.dir / f"{shard_name(split, n)}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if size != tokens * self.dtype.itemsize:
            raise DataError(f"{path}: {size} bytes on disk but index.json records {tokens} tokens; the shard "
                            f"directory is damaged: delete {self.dir} and run `qtrain prepare` again")
        if tokens == 0:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")  # (tokens,) nothing is read until indexed

    def doc_ends(self, split: str) -> np.ndarray:
        """End offsets of every document of the split, in the concatenated stream of all its shards."""
        out, base = [], 0
        for i, s in enumerate(self.index["shards"]):
            out.append(np.load(self.dir / f"{shard_name(split, i)}.docs.npy") + base)
            base += s[f"{split}_tokens"]
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def totals(self) -> dict:
        keys = ("train_tokens", "val_tokens", "train_docs", "val_docs", "chars")
        return {k: sum(s[k] for s in self.index["shards"]) for k in keys}
