"""A corpus source: a recipe value resolved to an ordered file list, its fingerprint, and its document stream.

A source is what one `[data] corpus` value (or one key of `[data.sources]`, or `[data] validation`) names:
    "default"        the embedded corpus (qtrain.data.default_corpus), one JSONL file in the cache;
    a file           read by its kind (qtrain.data.readers: text, JSON lines, Parquet, Arrow; .gz / .zst);
    a directory      every data file below it, recursively, sorted by path, whatever their kinds (.txt / .md,
                     JSON lines, Parquet, Arrow: each file read by its own kind); only a README beside
                     record files (Parquet shards' README.md) is not a document. A dataset saved with Hugging Face `datasets.save_to_disk` (a
                     state.json beside .arrow files) is read in its own file order; a DatasetDict
                     (dataset_dict.json) by its "train" split, or for `[data] validation` its
                     "validation" (else "test") split;
    a glob           "c4/en/c4-train.*.json.gz", "**" recursive: the matching files (and directories), sorted.

Fingerprint: a corpus is identified without reading it, by the list of its files with their sizes and
modification times (`[data] fingerprint = "stat"`), or on request by the sha256 of their bytes
("content"); plus the options that change the documents (text field, blank-line split). The embedded
corpus is identified by its version and size (it is rebuilt byte-identically on every machine).

Held-out documents: document j of file i (j counted from 0 within the file; the pieces of a long document
share its j) is a validation document when the interval (j*f + u_i, (j+1)*f + u_i] holds an integer,
f = `[data] val_fraction` and u_i in [0, 1) a fixed hash of i. So exactly one document in every 1/f of each
file is held out, spread evenly through it, at an offset that differs between files (a directory of
one-document files holds out a fraction f of its files). The rule needs only (i, j): the tokenizer sample
and a resumed prepare apply it anywhere without reading what comes before.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from qtrain.config.recipe import DataConfig
from qtrain.data.default_corpus import default_corpus_path
from qtrain.data.readers import DEFAULT_CORPUS, file_kind, is_data_file, read_file
from qtrain.errors import DataError

SAMPLE_FILES = 16  # the tokenizer sample is drawn from up to this many files, evenly spaced through a source
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "arrow" (qtrain.data.readers.file_kind)
    size: int  # bytes on disk
    mtime_ns: int


@dataclass
class Source:
    """One corpus source: its files in reading order and the options that turn them into documents."""

    spec: str  # the recipe's value
    key: str  # the recipe key that names it, for error messages: [data] corpus, [data.sources], [data] validation
    files: list[SourceFile]
    text_field: str = "text"
    split_blank_lines: int = 0
    weight: float = 1.0
    embedded: bool = False  # the default corpus
    skip_unreadable: bool = False  # [data] skip_unreadable: a damaged file ends at the damage, with a warning

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self, mode: str = "stat") -> str:
        """sha256 of what decides this source's documents: files (stat or content) and reading options."""
        if self.embedded:
            files = [[f.path.name, f.size] for f in self.files]  # versioned name: the same bytes everywhere
        elif mode == "content":
            files = [[str(f.path), f.size, _sha256_file(f.path)] for f in self.files]
        else:
            files = [[str(f.path), f.size, f.mtime_ns] for f in self.files]
        uses_field = any(f.kind != "text" for f in self.files)
        uses_blank = any(f.kind == "text" for f in self.files)
        blob = {"files": files, "text_field": self.text_field if uses_field else None,
                "split_blank_lines": self.split_blank_lines if uses_blank else None}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def kinds(self) -> dict[str, int]:
        """Files of each kind, e.g. {"text": 300, "jsonl": 1}."""
        out: dict[str, int] = {}
        for f in self.files:
            out[f.kind] = out.get(f.kind, 0) + 1
        return dict(sorted(out.items()))

    def describe(self) -> str:
        kinds = self.kinds()
        what = ", ".join(f"{n} {k}" for k, n in kinds.items()) if len(kinds) > 1 else next(iter(kinds), "")
        n = len(self.files)
        return f"{self.spec} ({n} file{'s' * (n != 1)}, {what}, {_mb(self.total_bytes)})"


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --- resolution ----------------------------------------------------------------------------------------


def resolve_source(spec: str, cache_root: Path, *, text_field: str = "text", split_blank_lines: int = 0,
                   weight: float = 1.0, key: str = "[data] corpus", split: str = "train") -> Source:
    """The files that a recipe value names (see the module docstring). Raises DataError naming `key`."""
    if spec == DEFAULT_CORPUS:
        path = default_corpus_path(cache_root)
        return Source(spec, key, [_stat(path)], "text", 0, weight, embedded=True)
    expanded = os.path.expanduser(spec)
    if _GLOB_CHARS & set(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f'{key} = "{spec}": the pattern matches no file; check the path, or give a file or '
                            f'a directory')
        paths: list[Path] = []
        for m in map(Path, matches):
            paths += _directory_files(m, spec, key, split) if m.is_dir() else [m]
    else:
        path = Path(expanded)
        if not path.exists():
            raise DataError(f'{key} = "{spec}": no such file or directory; give an existing path, or "default" '
                            f'for the embedded corpus')
        paths = _directory_files(path, spec, key, split) if path.is_dir() else [path]
    return Source(spec, key, [_stat(p) for p in paths], text_field, split_blank_lines, weight)


def _stat(path: Path) -> SourceFile:
    st = path.stat()
    return SourceFile(path, file_kind(path), st.st_size, st.st_mtime_ns)


def _directory_files(path: Path, spec: str, key: str, split: str) -> list[Path]:
    if (path / "dataset_dict.json").is_file():  # datasets.DatasetDict.save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        wanted = ["train"] if split == "train" else ["validation", "valid", "val", "test"]
        chosen = next((s for s in wanted if s in splits and (path / s).is_dir()), None)
        if chosen is None:
            raise DataError(f'{key} = "{spec}" is a saved DatasetDict with splits {splits} and none of '
                            f'{wanted}; point {key} at one split directory, e.g. "{Path(spec) / splits[0]}"'
                            if splits else f'{key} = "{spec}": dataset_dict.json lists no splits')
        path = path / chosen
    if (path / "state.json").is_file() and any(path.glob("*.arrow")):  # datasets.Dataset.save_to_disk
        state = json.loads((path / "state.json").read_text())
        return [path / f["filename"] for f in state.get("_data_files", [])]
    found = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if any(file_kind(p) != "text" for p in found):  # a README beside data shards documents them: not a document
        found = [p for p in found if not (file_kind(p) == "text" and p.name.lower().startswith("readme"))]
    if found:
        return found
    raise DataError(f'{key} = "{spec}": the directory has no .txt or .md files and no .jsonl / .json(.gz/.zst), '
                    f'.parquet or .arrow files')


def resolve_sources(data_cfg: DataConfig, cache_root: Path) -> tuple[list[Source], Source | None]:
    """(the training sources with their mixture weights, the separate validation source or None)."""
    if data_cfg.sources:
        train = []
        for spec, value in data_cfg.sources.items():
            opts = value if isinstance(value, dict) else {"weight": value}
            train.append(resolve_source(spec, cache_root, text_field=opts.get("text_field", data_cfg.text_field),
                                        split_blank_lines=opts.get("split_blank_lines", data_cfg.split_blank_lines),
                                        weight=float(opts.get("weight", 1.0)), key=f'[data.sources] "{spec}"'))
    else:
        train = [resolve_source(data_cfg.corpus, cache_root, text_field=data_cfg.text_field,
                                split_blank_lines=data_cfg.split_blank_lines)]
    val = None
    if data_cfg.validation:
        val = resolve_source(data_cfg.validation, cache_root, text_field=data_cfg.text_field,
                             split_blank_lines=data_cfg.split_blank_lines, key="[data] validation", split="validation")
    for s in train + ([val] if val else []):
        s.skip_unreadable = data_cfg.skip_unreadable
    return train, val


# --- the document stream -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a source's document stream stands: resumable from here without reading what came before."""

    file: int = 0  # index into Source.files
    pos: int = 0  # in-file position (bytes of the decompressed file, or rows)
    in_doc: int = 0  # inside a document cut into pieces: 1 at a line start, 2 inside a line (qtrain.data.readers)
    doc: int = 0  # documents of this file begun before pos (the held-out rule counts them)
    chars: int = 0  # characters emitted before (for max_corpus_chars)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Position:
        return cls(**d)


class Doc(NamedTuple):
    text: str
    last: bool  # False: a piece that the next Doc continues (no EOS after it)
    val: bool  # a held-out validation document


def file_phase(file_index: int) -> float:
    """u_i in [0, 1): the offset of file i's held-out stride (see the module docstring)."""
    digest = hashlib.blake2b(f"qtrain-val-{file_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def held_out(doc_index: int, phase: float, fraction: float) -> bool:
    """True when document doc_index of a file with this phase is a validation document."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    return math.floor((doc_index + 1) * fraction + phase) > math.floor(doc_index * fraction + phase)


class DocumentStream:
    """Iterate a source's documents from `start`; `position` is always the point after the last item yielded.

    val_fraction: held-out rule (0 = every document trains, 1 = every document validates).
    max_chars: stop after this many characters in total (0 = no limit), counted from the source's start.
    end_file: stop before this file index (None = read to the end of the source).
    """

    def __init__(self, source: Source, start: Position = Position(), val_fraction: float = 0.0, max_chars: int = 0,
                 end_file: int | None = None):
        self.source, self.start, self.val_fraction, self.max_chars, self.end_file = (
            source, start, val_fraction, max_chars, end_file)
        self._state = (start.file, start.pos, start.in_doc, start.doc, start.chars)  # a Position, built on demand
        self._streams: list = []
        self._done_bytes = sum(f.size for f in source.files[: start.file])

    @property
    def position(self) -> Position:
        return Position(*self._state)

    def raw_bytes(self) -> int:
        """Bytes of the files on disk read so far (compressed bytes for .gz / .zst): progress and ETA."""
        live = self._streams[-1].raw_pos() if self._streams else 0
        return self._done_bytes + live

    def __iter__(self) -> Iterator[Doc]:
        s, p = self.source, self.start
        chars, limit, fraction = p.chars, self.max_chars, self.val_fraction
        if limit and chars >= limit:
            return
        floor = math.floor
        for fi in range(p.file, len(s.files) if self.end_file is None else self.end_file):
            f = s.files[fi]
            start, in_doc, j = (p.pos, p.in_doc, p.doc) if fi == p.file else (0, 0, 0)
            phase = file_phase(fi)
            self._streams = []
            items = read_file(f.path, f.kind, text_field=s.text_field, split_blank_lines=s.split_blank_lines,
                              start=start, in_doc=in_doc, stream=self._streams, skip_unreadable=s.skip_unreadable)
            for text, last, pos, state in items:
                cut = bool(limit) and chars + len(text) >= limit
                if cut:
                    text, last = text[: limit - chars], True  # exactly max_chars in total
                chars += len(text)
                # held_out(j, phase, fraction), inlined: this loop runs once per document of the corpus
                val = fraction >= 1.0 or (fraction > 0.0 and floor((j + 1) * fraction + phase) > floor(j * fraction + phase))
                if last:
                    j += 1
                self._state = (fi, pos, 0 if last else (state or 1), j, chars)
                yield Doc(text, last, val)
                if cut:
                    items.close()
                    return
            self._streams = []
            self._done_bytes += f.size
            self._state = (fi + 1, 0, 0, 0, chars)


def stream_documents(source: Source, start: Position = Position(), val_fraction: float = 0.0,
                     max_chars: int = 0) -> DocumentStream:
    return DocumentStream(source, start, val_fraction, max_chars)


def sample_texts(sources: list[Source], budget_chars: int, val_fraction: float, max_chars: int = 0,
                 stops: list[int] | None = None) -> Iterator[str]:
    """Training documents (never held-out ones) for the tokenizer: about budget_chars in all.

    Each source gives a share of the budget by its weight, taken from the start of up to SAMPLE_FILES of its
    files spread evenly through its file list (equal shares per file). With max_chars the stream is truncated
    first, so the sample comes from its start. stops[i] > 0 (a source whose validation split is the tail of its
    token stream, qtrain.data.holdout): its sample reads no further than that many characters from its start.
    """
    total_weight = sum(s.weight for s in sources)
    for s, stop in zip(sources, stops or [0] * len(sources)):
        share = budget_chars * s.weight / total_weight
        n = len(s.files)
        limit = min(c for c in (max_chars, stop) if c) if (max_chars or stop) else 0
        fraction = 0.0 if stop else val_fraction
        if limit:  # the truncated stream, from its start
            spans = [(0, n)]
        elif n <= SAMPLE_FILES:
            spans = [(i, i + 1) for i in range(n)]
        else:
            spans = [(i, i + 1) for i in sorted({round(k * (n - 1) / (SAMPLE_FILES - 1)) for k in range(SAMPLE_FILES)})]
        left_over = 0.0
        for first, end in spans:
            budget, taken = share / len(spans) + left_over, 0
            for doc in DocumentStream(s, Position(file=first), fraction, limit, end_file=end):
                if doc.val:
                    continue
                yield doc.text
                taken += len(doc.text)
                if taken >= budget:
                    break
            left_over = max(0.0, budget - taken)  # a short file leaves its share to the next


def iter_documents(corpus: str, cache_root: Path, max_chars: int = 0, *, text_field: str = "text",
                   split_blank_lines: int = 0) -> Iterator[str]:
    """Stripped, non-empty documents of a `[data] corpus` value, cut to max_chars characters in total (0 = all).

    The simple whole-corpus view (tests, tools). Lazy: each call re-reads the source. Pieces of a long text
    document are joined back. Raises DataError on a missing path, a bad JSONL line, or a corpus with no text
    at all (checked once the source is exhausted).
    """
    source = resolve_source(corpus, Path(cache_root), text_field=text_field, split_blank_lines=split_blank_lines)
    parts: list[str] = []
    total = 0
    for doc in stream_documents(source, max_chars=max_chars):
        parts.append(doc.text)
        total += len(doc.text)
        if doc.last:
            yield "".join(parts)
            parts = []
    if parts:
        yield "".join(parts)
    if total == 0:
        raise DataError(f'[data] corpus = "{corpus}" contains no text (empty after stripping whitespace); '
                        f'add text to it or point [data] corpus elsewhere')
