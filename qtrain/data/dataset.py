"""Token data: corpus sources -> tokenizer -> token shards (prepared once, cached) -> training and eval windows.

`prepare_data` resolves the recipe's sources (qtrain.data.sources), identifies them by fingerprint (file list,
sizes, mtimes: nothing is read), trains or loads the tokenizer, and opens each source's token shards,
tokenizing the source first when its shards are missing or incomplete (qtrain.data.prepare: parallel,
resumable). A later start finds the shards by the same fingerprint and reads no corpus at all.

Cache layout under `DataConfig.cache_root()` (cache_dir, else $QTRAIN_CACHE, else ~/.cache/qtrain):
    corpus/default-py<X.Y.Z>-v<N>.jsonl        the default corpus, extracted at first use
    tokenizers/<sample key>-v<vocab>-<opts>.model  trained tokenizer (key: the training sources' identity,
                                                the held-out rule and the sample size)
    shards/<source key>-<tokenizer sha>/       one source's token shards (qtrain.data.shards)
Hashes are the first 16 hex digits of sha256. A run directory records which shards it trained on
(data.json), so `qtrain eval` reads them without the corpus (and without the recipe's corpus path).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from torch import Tensor

from qtrain.config.recipe import DataConfig
from qtrain.core.atomic import write_atomic
from qtrain.data.holdout import check_validation_source, plan_holdout, split_tail, tail_tokens
from qtrain.data.loader import TokenSampler, TokenStream, batches_of, val_batches, val_windows
from qtrain.data.prepare import planned_workers, tokenize_source
from qtrain.data.protocols import Tokenizer
from qtrain.data.shards import ShardSet, is_complete
from qtrain.data.sources import Source, resolve_sources, sample_texts
from qtrain.data.tokenizer import (
    check_vocab,
    document_prefix,
    load_tokenizer,
    save_run_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
    trainer_fingerprint,
)
from qtrain.errors import DataError

DATA_FORMAT = 2  # bump when the token stream of the same corpus and tokenizer changes
RUN_DATA_FILE = "data.json"  # in a run directory: identity and shard directories of its data

__all__ = ["Dataset", "TokenSampler", "prepare_data", "open_run_data", "val_batches", "corpus_identity"]


@dataclass
class Dataset:
    """A prepared corpus: per-source training and validation token streams, the tokenizer, the identity."""

    tokenizer: Tokenizer
    tokenizer_path: Path
    corpus_sha256: str
    tokenizer_sha256: str
    names: list[str]  # the source of each training stream, as the recipe writes it
    train_streams: list[TokenStream]
    weights: list[float]  # mixture weights of the training streams
    val_streams: list[TokenStream]
    val_weights: list[float]
    shard_dirs: list[Path]  # the training sources' shard directories (then the validation source's, if any)
    eval_tokens: int = 0  # [data] eval_tokens (0: eval_batches windows)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines for the run header (how validation was formed)

    run_record: dict = field(default_factory=dict)  # what data.json records (set by prepare_data)

    def identity(self) -> dict[str, str]:
        """What a checkpoint records of its data: a resume or an eval on other data can say so."""
        return {"corpus": self.corpus_sha256, "tokenizer": self.tokenizer_sha256}

    def record(self, run_dir: Path) -> None:
        """Copy the tokenizer into run_dir and write run_dir/data.json (identity and shard directories)."""
        save_run_tokenizer(self.tokenizer_path, run_dir)
        if self.run_record:
            write_atomic(Path(run_dir) / RUN_DATA_FILE, json.dumps(self.run_record, indent=1).encode())

    @property
    def train(self) -> TokenStream:
        """All training tokens, the sources laid end to end (len() is the training token count)."""
        return TokenStream.concat(self.train_streams)

    @property
    def val(self) -> TokenStream:
        return TokenStream.concat(self.val_streams)

    @property
    def token_path(self) -> Path:
        """The (first) shard directory."""
        return self.shard_dirs[0]

    @property
    def num_train_tokens(self) -> int:
        return sum(len(s) for s in self.train_streams)

    @property
    def num_val_tokens(self) -> int:
        return sum(len(s) for s in self.val_streams)

    def describe(self) -> str:
        return (f"data: {', '.join(self.names)}: {self.num_train_tokens:,} training tokens, {self.num_val_tokens:,} "
                f"validation tokens")

    def epoch(self) -> tuple[int, str]:
        return self.num_train_tokens, "tokens"

    def val_window_count(self, seq_len: int) -> int:
        return sum(max(0, (len(s) - 1) // seq_len) for s in self.val_streams)

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> TokenSampler:
        return TokenSampler(self.train_streams, batch_size, seq_len, seed, self.weights)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed evaluation windows spread over the whole validation set (shared among sources by weight).

        eval_tokens > 0 sets their number to eval_tokens // seq_len (at least one), else n_batches × batch_size.
        """
        n = max(1, self.eval_tokens // seq_len) if self.eval_tokens else n_batches * batch_size
        return batches_of(val_windows(self.val_streams, n, seq_len, self.val_weights), batch_size)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def corpus_identity(data_cfg: DataConfig, train: list[Source], val: Source | None) -> tuple[str, list[str], str | None]:
    """(corpus sha256, fingerprint of each training source, of the validation source): stat only by default."""
    mode = data_cfg.fingerprint
    fps = [s.fingerprint(mode) for s in train]
    val_fp = val.fingerprint(mode) if val is not None else None
    blob = {"format": DATA_FORMAT, "sources": [[fp, s.weight] for fp, s in zip(fps, train)],
            "validation": val_fp, "val_fraction": None if val is not None else data_cfg.val_fraction,
            "max_chars": data_cfg.max_corpus_chars}
    return _sha(blob), fps, val_fp


def prepare_data(data_cfg: DataConfig, vocab_size: int, seq_len: int, run_dir: Path | None = None, *,
                 progress: bool = True) -> Dataset:
    """Resolve the sources, get the tokenizer, prepare (or open) the token shards, check lengths.

    vocab_size is [model] vocab_size and seq_len is [train] seq_len. With run_dir, the tokenizer is copied
    into run_dir and run_dir/data.json records the identity and shard directories (for `qtrain eval`).
    Raises DataError.
    """
    root = data_cfg.cache_root()
    train_sources, val_source = resolve_sources(data_cfg, root)
    corpus_sha, fps, val_fp = corpus_identity(data_cfg, train_sources, val_source)
    held_out = 0.0 if val_source is not None else data_cfg.val_fraction
    # checks that need no tokens come first: nothing is trained or tokenized for a corpus that cannot be used
    if val_source is None:
        plans = [plan_holdout(s, fp, held_out, seq_len, data_cfg.max_corpus_chars, root) for s, fp in zip(train_sources, fps)]
    else:
        plans = [None] * len(train_sources)
        check_validation_source(val_source, seq_len, data_cfg.max_corpus_chars)

    tokenizer_path = _tokenizer_file(data_cfg, train_sources, fps, held_out, vocab_size, root, plans)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab(tokenizer, vocab_size)
    tokenizer_sha = tokenizer_sha256(tokenizer_path)
    prefix = document_prefix(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)

    # a tail-mode source is tokenized whole into its training split (the same shards as with a separate
    # validation source) and cut below
    jobs = [(s, fp, 0.0 if p is not None and p.tail else held_out) for s, fp, p in zip(train_sources, fps, plans)]
    if val_source is not None:
        jobs.append((val_source, val_fp, 1.0))
    sets, dirs = [], []
    for source, fp, fraction in jobs:
        key = _sha({"format": DATA_FORMAT, "source": fp, "held_out": fraction, "max_chars": data_cfg.max_corpus_chars,
                    # shards made before documents began with the tokenizer's BOS (only tokenizers that add one)
                    **({"prefix": prefix} if prefix else {})})
        out = root / "shards" / f"{key[:16]}-{tokenizer_sha[:16]}"
        if not is_complete(out):
            workers = planned_workers(data_cfg.prepare_workers, source, data_cfg.max_corpus_chars)
            meta = {"source": source.spec, "fingerprint": fp, "held_out": fraction, "tokenizer": tokenizer_sha,
                    "max_chars": data_cfg.max_corpus_chars}
            done = tokenize_source(source, tokenizer, tokenizer_path, out, dtype, val_fraction=fraction,
                                   max_chars=data_cfg.max_corpus_chars, workers=workers, meta=meta,
                                   progress=progress)
            tokens = done["train_tokens"] + done["val_tokens"]
            print(f"prepared {source.describe()}: {done['train_docs'] + done['val_docs']:,} documents, "
                  f"{tokens:,} tokens in {done['seconds']:.1f} s ({done['chars'] / 1e6 / max(done['seconds'], 1e-9):.1f} "
                  f"M chars/s, {workers} worker{'s' * (workers != 1)}) -> {out}", file=sys.stderr)
        sets.append(ShardSet(out))
        dirs.append(out)

    tails = [tail_tokens(len(TokenStream(sets[i].train)), held_out, seq_len) if p is not None and p.tail else 0
             for i, p in enumerate(plans)]
    ds = _dataset(tokenizer, Path(tokenizer_path), corpus_sha, tokenizer_sha, [s.spec for s in train_sources],
                  [s.weight for s in train_sources], sets, dirs, val_source is not None, tails, data_cfg.eval_tokens)
    for source in train_sources + ([val_source] if val_source else []):
        if len(source.kinds()) > 1:  # a directory of several kinds: every file is read, each by its kind
            ds.notes.append(f"files: {source.describe()}: every file read, each by its kind")
    _check_lengths(ds, data_cfg, train_sources, val_source, seq_len)
    ds.run_record = {"identity": ds.identity(),
                     "sources": [{"spec": s.spec, "weight": s.weight, "shards": str(d), "val_tail": t}
                                 for s, d, t in zip(train_sources, dirs, tails)],
                     "validation": {"spec": val_source.spec, "shards": str(dirs[-1])} if val_source else None}
    if run_dir is not None:
        ds.record(run_dir)
    return ds


def _dataset(tokenizer, tokenizer_path: Path, corpus_sha: str, tokenizer_sha: str, specs: list[str],
             weights: list[float], sets: list[ShardSet], dirs: list[Path], separate_val: bool, tails: list[int],
             eval_tokens: int) -> Dataset:
    """The Dataset of opened shard sets: training sources (their recipe specs and weights) first, then the
    validation source's when separate; tails[i] > 0 holds out the last tails[i] tokens of source i
    (qtrain.data.holdout)."""
    train_sets = sets[: len(tails)]
    train, val, stats, notes = [], [], {"train": [], "val": []}, []
    for spec, shard_set, held in zip(specs, train_sets, tails):
        stream, totals = TokenStream(shard_set.train), shard_set.totals()
        if held:
            stream, tail = split_tail(stream, min(held, len(stream)))
            val.append(tail)
            totals = {**totals, "train_tokens": len(stream), "val_tokens": len(tail), "val_tail": True}
            stats["val"].append(totals)
            notes.append(f"validation: the last {len(tail):,} tokens of {spec} ({len(tail) / max(len(stream) + len(tail), 1):.1%}"
                         f" of its tokens; its {totals['train_docs']:,} document(s) are too few to hold out whole ones)")
        elif not separate_val:
            val.append(TokenStream(shard_set.val))
            stats["val"].append(totals)
        train.append(stream)
        stats["train"].append(totals)
    if separate_val:
        val, stats["val"] = [TokenStream(sets[-1].val)], [sets[-1].totals()]
    return Dataset(tokenizer, tokenizer_path, corpus_sha, tokenizer_sha, specs, train, weights, val,
                   [1.0] if separate_val else weights, dirs, eval_tokens, stats, notes)


def _check_lengths(ds: Dataset, data_cfg: DataConfig, train: list[Source], val: Source | None, seq_len: int) -> None:
    need = seq_len + 1  # one window: seq_len inputs and the token after the last as its target
    for name, stream, stats, source in zip(ds.names, ds.train_streams, ds.stats["train"], train):
        if len(stream) < need:
            held = (f"the last {stats['val_tokens']} tokens held out for validation" if stats.get("val_tail") else
                    f"{stats['val_docs']} held out for validation")
            raise DataError(
                f"{source.key} = \"{name}\": the training split holds {len(stream)} tokens "
                f"({stats['train_docs']} documents, {held}) but needs at least "
                f"seq_len+1 = {need}; provide more text or lower train.seq_len")
    if ds.num_val_tokens < need:
        if val is not None:
            where = f'[data] validation = "{val.spec}" holds'
            fix = "give a larger validation source or lower train.seq_len"
        else:
            docs = sum(s["train_docs"] + s["val_docs"] for s in ds.stats["train"])
            where = (f"the validation split ({sum(s['val_docs'] for s in ds.stats['val'])} of {docs} documents held "
                     f"out: [data] val_fraction = {data_cfg.val_fraction}) holds")
            fix = ("raise data.val_fraction, split text files into more documents (data.split_blank_lines), "
                   "give a separate data.validation source, provide more text, or lower train.seq_len")
        raise DataError(f"{where} {ds.num_val_tokens} tokens but needs at least seq_len+1 = {need}; {fix}")


def _tokenizer_file(data_cfg: DataConfig, sources: list[Source], fps: list[str], held_out: float,
                    vocab_size: int, root: Path, plans: list | None = None) -> Path:
    """The user's tokenizer, or the one trained on a sample of the training documents (trained now unless cached).

    A tail-mode source (qtrain.data.holdout) gives its sample from its start, stopping before its tail."""
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer).expanduser()
    budget = data_cfg.tokenizer_sample_mb * 1_000_000
    stops = [p.sample_stop(held_out) if p is not None else 0 for p in plans or [None] * len(sources)]
    blob = {"format": DATA_FORMAT, "sources": [[fp, s.weight] for fp, s in zip(fps, sources)],
            "held_out": held_out, "max_chars": data_cfg.max_corpus_chars, "sample_chars": budget}
    if any(stops):  # (only then: the key of every other corpus stays as it was)
        blob["sample_stops"] = stops
    key = _sha(blob)
    path = root / "tokenizers" / f"{key[:16]}-v{vocab_size}-{trainer_fingerprint(data_cfg.tokenizer_sentences)}.model"
    if not path.exists():
        t0 = time.perf_counter()
        print(f"training a sentencepiece tokenizer ({vocab_size} pieces) on up to {data_cfg.tokenizer_sample_mb} M "
              f"characters of training documents ([data] tokenizer_sample_mb) ...", file=sys.stderr)
        train_tokenizer(sample_texts(sources, budget, held_out, data_cfg.max_corpus_chars, stops), vocab_size, path,
                        sentences=data_cfg.tokenizer_sentences)
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s -> {path}", file=sys.stderr)
    return path


def open_run_data(run_dir: Path, data_cfg: DataConfig, tokenizer_path: Path) -> Dataset | None:
    """The token shards a run trained on, from its data.json, with the run's tokenizer: no corpus is read.

    None when the run has no data.json or its shards are gone (the caller prepares the data again).
    """
    path = Path(run_dir) / RUN_DATA_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    dirs = [Path(s["shards"]) for s in record["sources"]]
    val_dir = Path(record["validation"]["shards"]) if record.get("validation") else None
    if not all(is_complete(d) for d in dirs + ([val_dir] if val_dir else [])):
        return None
    tokenizer = load_tokenizer(tokenizer_path)
    sets = [ShardSet(d) for d in dirs + ([val_dir] if val_dir else [])]
    recorded = record["sources"]
    return _dataset(tokenizer, Path(tokenizer_path), record["identity"]["corpus"], record["identity"]["tokenizer"],
                    [s["spec"] for s in recorded], [float(s["weight"]) for s in recorded], sets,
                    dirs + ([val_dir] if val_dir else []), val_dir is not None,
                    [int(s.get("val_tail", 0)) for s in recorded], data_cfg.eval_tokens)


def fingerprint_now(data_cfg: DataConfig) -> str | None:
    """The corpus identity of the recipe's sources as they are on disk now (stat only), or None if unreadable."""
    specs = list(data_cfg.sources) or [data_cfg.corpus]
    if "default" in specs or data_cfg.fingerprint != "stat":
        return None  # the embedded corpus cannot change; a content fingerprint would read the whole corpus
    try:
        train, val = resolve_sources(data_cfg, data_cfg.cache_root())
        return corpus_identity(data_cfg, train, val)[0]
    except (DataError, OSError):
        return None
