"""Tokenize one corpus source into token shards: in parallel, in bounded memory, resumable, with progress.

The main process streams the source's documents (qtrain.data.sources: reading, decompression, JSON parsing and
the held-out choice are cheap next to tokenizing) and cuts the stream into units of about UNIT_CHARS
characters. Worker processes (spawned, so they hold only the tokenizer, not torch) encode units; the main
process appends their results to the shards strictly in stream order (qtrain.data.shards). The token stream is
therefore the same whatever the number of workers, and at most `workers + 2` units are in flight:
memory is bounded by the unit size, not by the corpus size (each worker also holds its tokenizer).

A start after a kill reopens the shard directory and continues the stream at the position recorded for the
last closed shard: only the unclosed part is read and tokenized again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from qtrain.data.shards import SHARD_TOKENS, Encoded, ShardWriter
from qtrain.data.sources import Doc, DocumentStream, Position, Source
from qtrain.data.tokenizer import document_prefix
from qtrain.errors import DataError

UNIT_CHARS = 8 << 20  # characters of text per unit of work handed to a worker
ENCODE_BATCH_CHARS = 1 << 20  # characters per tokenizer call inside a unit (bounds the Python id lists)
PROGRESS_EVERY_S = 10.0  # a plain progress line this often when stderr is not a terminal
TTY_REFRESH_S = 0.5


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- encoding (runs in the workers, or in-process) ------------------------------------------------------


# flag bits of a unit's documents: the last piece of a document (EOS after it), held out, the first piece of a
# document (the tokenizer's prefix, qtrain.data.tokenizer.document_prefix, before it)
LAST, VAL, FIRST = 1, 2, 4


def pack(docs: list[Doc]) -> tuple[list[str], bytes]:
    """A unit as (texts, flags): plain lists pickle ten times faster than a list of named tuples."""
    return [d.text for d in docs], bytes(LAST * d.last | VAL * d.val for d in docs)


def encode_docs(tokenizer, unit: tuple[list[str], bytes], dtype: np.dtype, num_threads: int = 1,
                prefix: list[int] = ()) -> Encoded:
    """Token ids of each text, prefix (the tokenizer's BOS, if it adds one) before the first piece of each
    document and EOS after its last, split into train and val."""
    texts, flags = unit
    eos, prefix = [tokenizer.eos_id()], list(prefix)
    parts = {"train": [], "val": []}  # numpy arrays, one per tokenizer call
    ends = {"train": [], "val": []}
    filled = {"train": 0, "val": 0}
    chars = n_docs = 0
    start = 0
    while start < len(texts):
        stop, size = start, 0
        while stop < len(texts) and (size < ENCODE_BATCH_CHARS or stop == start):
            size += len(texts[stop])
            stop += 1
        ids = tokenizer.encode(texts[start:stop], num_threads=num_threads)
        for split, want in (("train", 0), ("val", VAL)):
            lists, n = [], filled[split]
            for flag, doc_ids in zip(flags[start:stop], ids):
                if flag & VAL != want:
                    continue
                if flag & FIRST and prefix:
                    lists.append(prefix)
                    n += len(prefix)
                lists.append(doc_ids)
                n += len(doc_ids)
                if flag & LAST:
                    lists.append(eos)
                    n += 1
                    ends[split].append(n)
            if lists:
                count = n - filled[split]
                parts[split].append(np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=count))
                filled[split] = n
        chars += size
        n_docs += sum(flag & LAST for flag in flags[start:stop])
        start = stop

    def cat(split: str) -> np.ndarray:
        return np.concatenate(parts[split]) if parts[split] else np.empty(0, dtype=dtype)

    return Encoded(cat("train"), np.asarray(ends["train"], dtype=np.int64), cat("val"),
                   np.asarray(ends["val"], dtype=np.int64), chars, n_docs)


_worker: dict = {}


class _BackendTokenizer:
    """A Hugging Face tokenizer's Rust backend in a worker: the same ids as HFTokenizer.encode, without
    importing transformers (which would cost every worker seconds and hundreds of MB)."""

    def __init__(self, backend_json: str, eos: int):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend_json)
        self.eos = eos

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def eos_id(self) -> int:
        return self.eos


def worker_tokenizer(tokenizer, tokenizer_path: Path) -> tuple:
    """What a worker needs to rebuild the tokenizer: a sentencepiece file, or a HF tokenizer's backend JSON."""
    backend = getattr(getattr(tokenizer, "hf", None), "backend_tokenizer", None)
    if backend is not None:
        return ("hf", backend.to_str(), tokenizer.eos_id())
    return ("spm", str(tokenizer_path))


def _die_with_parent(parent: int) -> None:
    """End this worker when the process that started it dies: a `kill -9` of `qtrain prepare` runs no cleanup,
    and its workers would otherwise go on encoding into a queue nobody reads. Linux: the kernel sends SIGKILL
    (PR_SET_PDEATHSIG); elsewhere a thread polls the parent's pid."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    else:
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _init_worker(spec: tuple, dtype: str, prefix: list[int], parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker for Hugging Face tokenizers too
    if spec[0] == "hf":
        _worker["tokenizer"] = _BackendTokenizer(spec[1], spec[2])
    else:
        import sentencepiece as spm

        _worker["tokenizer"] = spm.SentencePieceProcessor(model_file=spec[1])
    _worker["dtype"] = np.dtype(dtype)
    _worker["prefix"] = prefix


def _encode_task(unit: tuple[list[str], bytes]) -> Encoded:
    return encode_docs(_worker["tokenizer"], unit, _worker["dtype"], prefix=_worker["prefix"])


# --- progress ------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A progress line: redrawn in place on a terminal, else one plain line every PROGRESS_EVERY_S seconds.

    Shows input read (MB of the files on disk, compressed as stored), MB/s, documents, tokens and the ETA.
    """

    def __init__(self, label: str, total_bytes: int, done_bytes: int = 0, stream=None, enabled: bool = True):
        self.label = label
        self.total = max(total_bytes, 1)
        self.start_bytes = done_bytes
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()
        self.state = (done_bytes, 0, 0)

    def line(self) -> str:
        done, docs, tokens = self.state
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start_bytes) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100 * min(done / self.total, 1.0)
        return (f"prepare {self.label}: {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({pct:.0f} %), "
                f"{rate / 1e6:.1f} MB/s, {docs:,} documents, {tokens / 1e6:,.1f}M tokens, "
                f"ETA {_duration(eta) if eta != float('inf') else '?'}")

    def update(self, raw_bytes: int, docs: int, tokens: int) -> None:
        self.state = (raw_bytes, docs, tokens)
        now = time.perf_counter()
        if not self.enabled or now - self.last < (TTY_REFRESH_S if self.tty else PROGRESS_EVERY_S):
            return
        self.last = now
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- the pipeline ---------------------------------------------------------------------------------------


def _units(stream: DocumentStream, unit_chars: int) -> Iterator[tuple[tuple[list[str], bytes], Position, int]]:
    """(unit (texts, flags), position after it, input bytes read) of about unit_chars characters each."""
    texts, flags, chars = [], bytearray(), 0
    first = stream.start.in_doc == 0  # a resume may start inside a document cut into pieces
    for text, last, val in stream:
        texts.append(text)
        flags.append(LAST * last | VAL * val | FIRST * first)
        first = last
        chars += len(text)
        if chars >= unit_chars:
            yield (texts, bytes(flags)), stream.position, stream.raw_bytes()
            texts, flags, chars = [], bytearray(), 0
    if texts:
        yield (texts, bytes(flags)), stream.position, stream.raw_bytes()


def planned_workers(requested: int, source: Source, max_chars: int, unit_chars: int | None = None) -> int:
    """Worker processes worth starting: the request (0 = every core), at most one per expected unit."""
    unit_chars = unit_chars or UNIT_CHARS
    cores = requested or available_cores()
    text = sum(f.size * (4 if f.path.name.endswith((".gz", ".zst", ".parquet")) else 1) for f in source.files)
    if max_chars:
        text = min(text, max_chars)
    return max(1, min(cores, -(-text // unit_chars)))


def tokenize_source(source: Source, tokenizer, tokenizer_path: Path, out_dir: Path, dtype: np.dtype, *,
                    val_fraction: float, max_chars: int = 0, workers: int = 1, meta: dict | None = None,
                    shard_tokens: int | None = None, unit_chars: int | None = None, progress: bool = True,
                    label: str = "") -> dict:
    """Write (or finish) the shards of `source` in out_dir; returns the totals (tokens, documents, time).

    workers > 1 spawns that many encoding processes; 1 encodes in this process. Raises DataError when the
    source holds no text. Two processes preparing the same directory (two runs started on a new corpus)
    take turns: the second waits for the first, then finds the shards complete.
    """
    with _locked(Path(out_dir)):
        return _tokenize(source, tokenizer, tokenizer_path, Path(out_dir), dtype, val_fraction, max_chars, workers,
                         meta, shard_tokens, unit_chars or UNIT_CHARS, progress, label)


def _disk_full(out_dir: Path, source: Source, writer: ShardWriter, tokens: int, raw_done: int, itemsize: int) -> DataError:
    """The error for a full disk: which directory, what the shards need, and that a rerun resumes."""
    free = shutil.disk_usage(out_dir).free
    kept = writer.totals()
    need = tokens * itemsize * source.total_bytes / max(raw_done, 1)  # extrapolated from what was read so far
    return DataError(
        f"no space left on the disk of {out_dir} while writing the token shards of {source.key} = \"{source.spec}\": "
        f"{tokens * itemsize / 1e9:.2f} GB of tokens after {raw_done / 1e6:,.0f} of {source.total_bytes / 1e6:,.0f} MB "
        f"of input, so about {need / 1e9:.2f} GB in all (plus their document offsets); {free / 1e9:.2f} GB is free "
        f"there now. Free space on that disk and run the same command again: it resumes from the last complete shard "
        f"({len(writer.index['shards'])} complete, {kept['train_tokens'] + kept['val_tokens']:,} tokens kept). Or put "
        f"the cache on a larger disk with [data] cache_dir or $QTRAIN_CACHE (that starts over)")


@contextlib.contextmanager
def _locked(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"waiting for another qtrain process (pid {holder}) that is preparing {out_dir} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _tokenize(source: Source, tokenizer, tokenizer_path: Path, out_dir: Path, dtype, val_fraction: float,
              max_chars: int, workers: int, meta: dict | None, shard_tokens: int | None, unit_chars: int,
              progress: bool, label: str) -> dict:
    writer = ShardWriter(out_dir, dtype, meta or {}, shard_tokens or SHARD_TOKENS)
    t0 = time.perf_counter()
    if writer.complete:
        return {**writer.totals(), "seconds": 0.0, "resumed_from": None, "workers": 0}
    resume = writer.resume_point()
    start = Position.from_dict(resume) if resume else Position()
    stream = DocumentStream(source, start, val_fraction, max_chars)
    before = writer.totals()
    bar = Progress(label or source.spec, source.total_bytes, stream.raw_bytes(), enabled=progress)
    if resume:
        print(f"prepare {label or source.spec}: resuming after {len(writer.index['shards'])} complete shard(s) "
              f"({before['train_tokens'] + before['val_tokens']:,} tokens)", file=sys.stderr)
    docs, tokens = before["train_docs"] + before["val_docs"], before["train_tokens"] + before["val_tokens"]

    def add(unit: Encoded, end: Position, raw: int) -> None:
        nonlocal docs, tokens
        writer.append(unit, end.to_dict(), raw)
        docs += unit.docs
        tokens += len(unit.train) + len(unit.val)
        bar.update(raw, docs, tokens)

    pool, prefix = None, document_prefix(tokenizer)
    try:
        if workers <= 1:
            for unit, end, raw in _units(stream, unit_chars):
                add(encode_docs(tokenizer, unit, dtype, num_threads=1, prefix=prefix), end, raw)
        else:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(worker_tokenizer(tokenizer, tokenizer_path), np.dtype(dtype).name,
                                                 prefix, os.getpid()))
            pending: deque = deque()
            for unit, end, raw in _units(stream, unit_chars):
                pending.append((pool.submit(_encode_task, unit), end, raw))
                del unit
                while pending and (len(pending) >= workers + 2 or pending[0][0].done()):
                    future, e, r = pending.popleft()
                    add(future.result(), e, r)
            while pending:
                future, e, r = pending.popleft()
                add(future.result(), e, r)
        if docs == 0:
            raise DataError(f'{source.key} = "{source.spec}" contains no text (empty after stripping whitespace); '
                            f'add text to it or point {source.key} elsewhere')
        writer.finish(stream.position.to_dict(), stream.raw_bytes())
    except OSError as e:
        writer.close()
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(out_dir, source, writer, tokens, stream.raw_bytes(), np.dtype(dtype).itemsize) from None
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    totals = writer.totals()
    return {**totals, "seconds": time.perf_counter() - t0, "resumed_from": resume, "workers": workers}
