"""Documents streamed out of one file, each with the position just after it: no file is ever read whole.

A reader yields `(text, last, pos)` per document (or per piece of one): `text` is the document's text,
`last` is False for a piece that the next item continues (only a very long text document is cut, at a
line end, every MAX_DOC_BYTES), and `pos` is where the next item starts. A reader opened at such a
position continues exactly there, which is what makes a killed `qtrain prepare` resumable.

File kinds (chosen by suffix; compression .gz or .zst is undone on the fly):
    text     .txt / .md / any other name: documents are separated by runs of at least
             `split_blank_lines` blank lines (whitespace-only lines), or one document per file when it is 0.
             pos = bytes of the (decompressed) file consumed.
    jsonl    .jsonl / .json (one JSON object per line: C4, Dolma and most dumps), optionally .gz / .zst:
             one document per line, from its `text_field`. pos = bytes consumed.
    parquet  .parquet (C4, FineWeb, SlimPajama, Dolma layouts): the `text_field` column, read one record
             batch at a time with pyarrow. pos = rows consumed.
    arrow    .arrow files of a dataset saved with Hugging Face `datasets` (save_to_disk: Arrow IPC
             streams), memory-mapped. pos = rows consumed.
Documents are stripped of surrounding whitespace and empty ones are dropped (a missing or null field too,
in columnar files). Non-UTF-8 bytes are dropped and an `UndecodableBytesWarning` names the file and the
count once the file is done. A damaged file (bad or truncated compression, corrupt Parquet) is an error that
names the file and where it broke, or with [data] skip_unreadable a warning, the file ending at the damage.
"""

from __future__ import annotations

import gzip
import io
import json
import warnings
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

from qtrain.data.default_corpus import default_corpus_path
from qtrain.errors import DataError

DEFAULT_CORPUS = "default"
MAX_DOC_BYTES = 4 << 20  # a longer text document is tokenized in pieces cut at line ends (bounded memory)
MAX_LINE_BYTES = 1 << 20  # a longer line (text files only) is read in chunks of this size
READ_BATCH_ROWS = 1024  # rows per record batch read from Parquet
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = (".gz", ".zst")


class UndecodableBytesWarning(UserWarning):
    """A corpus file had bytes that are not UTF-8; they were skipped."""


class Item(NamedTuple):
    text: str
    last: bool  # False: a piece of a long document, continued by the next item (no EOS after it)
    pos: int  # where the next item of this file starts (bytes or rows, see the module docstring)
    state: int = 0  # after a piece: 1 = the next item starts at a line start, 2 = inside a line


def file_kind(path: Path) -> str:
    """ "text", "jsonl", "parquet" or "arrow", from the file name (compression suffixes ignored)."""
    name = path.name.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def is_data_file(path: Path) -> bool:
    """A file a corpus directory is read for: text (.txt/.md), JSON lines, Parquet or Arrow, maybe compressed.

    A plain .json file is not one (dataset_info.json, configs): JSON lines in a directory are .jsonl / .ndjson,
    or .json.gz / .json.zst as C4 and Dolma ship them. Given alone as a file, any .json is read as JSON lines.
    """
    name = path.name.lower()
    stripped = name
    for c in COMPRESSIONS:
        stripped = stripped.removesuffix(c)
    if stripped.endswith(".json"):
        return stripped != name
    return stripped.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet", ".arrow"))


# --- byte streams ----------------------------------------------------------------------------------------


class ByteStream:
    """A file opened for reading lines of its decompressed bytes, starting at decompressed offset `start`.

    raw_pos() is how far into the file on disk reading has got (compressed bytes): progress and ETA.
    """

    def __init__(self, path: Path, start: int = 0):
        self.path = path
        self.raw = open(path, "rb")
        name = path.name.lower()
        if name.endswith(".gz"):
            self.f = io.BufferedReader(gzip.GzipFile(fileobj=self.raw, mode="rb"), 1 << 20)
        elif name.endswith(".zst"):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(self.raw, read_across_frames=True)
            self.f = io.BufferedReader(reader, 1 << 20)
        else:
            self.f = self.raw
        if start and self.f is self.raw:
            self.raw.seek(start)
        else:
            left = start
            while left:  # compressed: decompress and discard up to the start
                chunk = self.f.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)

    def raw_pos(self) -> int:
        return self._closed_at if self.raw.closed else self.raw.tell()

    def close(self) -> None:
        if self.raw.closed:
            return
        self._closed_at = self.raw.tell()
        if self.f is not self.raw:
            self.f.close()
        self.raw.close()


class _Utf8:
    """Decodes bytes as UTF-8, dropping undecodable ones and counting them for one warning per file."""

    def __init__(self, path: Path):
        self.path = path
        self.dropped = 0

    def __call__(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="surrogateescape")  # each bad byte -> one lone surrogate
            clean = text.encode("utf-8", errors="ignore").decode("utf-8")  # drops exactly those surrogates
            self.dropped += len(text) - len(clean)
            return clean

    def warn(self) -> None:
        if self.dropped:
            warnings.warn(f"{self.path}: skipped {self.dropped} undecodable bytes (not UTF-8); re-encode the "
                          f"file as UTF-8 to keep them", UndecodableBytesWarning, stacklevel=3)


# --- readers ---------------------------------------------------------------------------------------------


def read_file(path: Path, kind: str, *, text_field: str = "text", split_blank_lines: int = 0, start: int = 0,
              in_doc: int = 0, stream: list | None = None, skip_unreadable: bool = False) -> Iterator[Item]:
    """The documents of one file from position `start` (0 = its beginning); see the module docstring.

    in_doc: the `state` of the item that ended at `start` (nonzero: inside a document cut into pieces, the
    next text continues it). stream: when a list, the open ByteStream is appended to it (the caller reads
    raw_pos() for progress). A damaged file (a bad gzip or zstd stream, a truncated archive, a corrupt
    Parquet page) raises DataError naming the file and where it broke; with skip_unreadable the documents
    before the damage are kept, an UnreadableFileWarning says what was left out, and the file ends there.
    """
    streams = stream if stream is not None else []
    if kind == "text":
        items = _read_text(path, split_blank_lines, start, in_doc, streams)
    elif kind == "jsonl":
        items = _read_jsonl(path, text_field, start, streams)
    elif kind == "parquet":
        items = _read_parquet(path, text_field, start)
    elif kind == "arrow":
        items = _read_arrow(path, text_field, start)
    else:
        raise ValueError(kind)
    return _guarded(items, path, kind, start, streams, skip_unreadable)


class UnreadableFileWarning(UserWarning):
    """A damaged corpus file was read up to the damage and the rest of it left out ([data] skip_unreadable)."""


def _damage(e: BaseException) -> str | None:
    """What broke, in words, for the errors of a damaged file; None for any other error (raised as it is)."""
    if isinstance(e, gzip.BadGzipFile):
        text = str(e)
        return ("not a gzip file (its first bytes are not the gzip magic number)" if text.startswith("Not a gzipped")
                else f"the gzip data is corrupt ({text})")
    if isinstance(e, EOFError):
        return f"the compressed data ends early: the file is truncated ({e})"
    if isinstance(e, zlib.error):
        return f"the gzip data is corrupt ({e})"
    if type(e).__name__ in ("ZstdError", "ArrowInvalid") or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError)):
        return f"{type(e).__name__}: {e}"
    return None


def _guarded(items: Iterator[Item], path: Path, kind: str, start: int, streams: list, skip: bool) -> Iterator[Item]:
    done, pos = 0, start
    try:
        for item in items:
            yield item
            done += item.last
            pos = item.pos
    except Exception as e:  # noqa: BLE001 (the damaged-file errors are told apart by _damage)
        reason = _damage(e)
        if reason is None:
            raise
        raw = streams[-1].raw_pos() if streams else None
        unit = "rows" if kind in ("parquet", "arrow") else "bytes of decompressed data" if path.name.lower().endswith(
            COMPRESSIONS) else "bytes"
        where = (f"at byte {raw:,} of {path.stat().st_size:,} on disk, " if raw is not None else "") + \
                f"after {done:,} documents ({pos:,} {unit}) read fine from position {start:,}"
        if skip:
            warnings.warn(f"{path}: {reason}, {where}; [data] skip_unreadable = true: those documents are kept and "
                          f"the rest of this file is left out", UnreadableFileWarning, stacklevel=2)
            return
        raise DataError(f"{path}: {reason}, {where}. The documents before that point and the other files are "
                        f"intact. Replace the file (e.g. download it again), remove it from the corpus, or set "
                        f"[data] skip_unreadable = true to keep what precedes the damage and go on") from None


def _read_text(path: Path, blank_lines: int, start: int, in_doc: int, streams: list | None) -> Iterator[Item]:
    """Documents separated by runs of >= blank_lines blank lines (0: the whole file is one document).

    in_doc: 0 = `start` is between documents, 1 = inside a document at a line start, 2 = inside a line.
    A piece ends at a line end, or inside a line (at a character boundary) once a line alone is too long.
    """
    s = ByteStream(path, start)
    if streams is not None:
        streams.append(s)
    utf8 = _Utf8(path)
    pos = start
    lines: list[bytes] = []  # the current document's lines (or chunks of a long line), blank lines inside it included
    size = 0
    blank_run = 0
    first_piece = not in_doc  # False while continuing a document already cut into pieces
    continuing = in_doc == 2  # the previous chunk ended inside a line

    def emit(last: bool) -> Item | None:
        """The buffered lines as one item; None when nothing is to be emitted (an empty first piece)."""
        nonlocal lines, size, first_piece
        text = utf8(b"".join(lines))
        lines, size = [], 0
        if first_piece:
            text = text.lstrip()
        if last:
            text = text.rstrip()
        if not text and first_piece:
            return None  # whitespace only: no document (a continued document always ends with an item)
        first_piece = last
        state = 0 if last else (1 if not continuing else 2)
        return Item(text, last, pos, state)

    try:
        carry = b""  # the incomplete UTF-8 character at the end of a chunk of an over-long line
        while True:
            chunk = s.f.readline(MAX_LINE_BYTES)
            if not chunk:
                break
            pos += len(chunk)
            ends_line = chunk.endswith(b"\n")
            if not ends_line and len(chunk) == MAX_LINE_BYTES:  # a chunk of a longer line
                data, carry = _split_utf8(carry + chunk)
            else:
                data, carry = carry + chunk, b""
            blank = not continuing and ends_line and not data.strip()
            continuing = not ends_line
            if blank:
                blank_run += 1
                if blank_lines and blank_run >= blank_lines:
                    if lines or not first_piece:
                        item = emit(last=True)
                        if item:
                            yield item
                elif lines or not first_piece:
                    lines.append(data)
                    size += len(data)
                continue
            blank_run = 0
            lines.append(data)
            size += len(data)
            if not carry and (size >= MAX_DOC_BYTES and ends_line or size >= 2 * MAX_DOC_BYTES):
                item = emit(last=False)
                if item:
                    yield item
        if carry:
            lines.append(carry)
        if lines or not first_piece:
            item = emit(last=True)
            if item:
                yield item
    finally:
        s.close()
    utf8.warn()


def _split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(data up to its last complete UTF-8 character, the incomplete tail) for a chunk cut anywhere."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:  # ASCII: complete
            return data, b""
        if b >= 0xC0:  # lead byte: complete if the sequence it starts fits
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return (data, b"") if back >= need else (data[:-back], data[-back:])
    return data, b""


def _read_jsonl(path: Path, field: str, start: int, streams: list | None) -> Iterator[Item]:
    s = ByteStream(path, start)
    if streams is not None:
        streams.append(s)
    utf8 = _Utf8(path)
    pos = start
    lineno = 0  # counted from `start` (an error after a resume names the line from there)
    loads = json.loads
    try:
        for line in s.f:
            pos += len(line)
            lineno += 1
            if not line.strip():
                continue
            try:
                try:
                    text = line.decode("utf-8")  # str: json skips its encoding detection
                except UnicodeDecodeError:
                    text = utf8(line)
                record = loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{lineno}: no string "{field}" field; each line must look like '
                                f'{{"{field}": "..."}} (or set [data] text_field to the field that holds the text)')
            text = text.strip()
            if text:
                yield Item(text, True, pos)
    finally:
        s.close()
    utf8.warn()


def json_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line of a JSON-lines file (.gz / .zst too), streamed. Lines end
    at b"\\n" only: a JSON string may hold U+2028 and other characters str.splitlines() would break at."""
    s = ByteStream(Path(path))
    try:
        for lineno, line in enumerate(s.f, start=1):
            if line.strip():
                yield lineno, line
    finally:
        s.close()


def first_json_line(path: Path) -> tuple[int, bytes] | None:
    """(line number, bytes) of the first non-blank line of a JSON-lines file, or None: sniffing a corpus's
    record kind reads one buffer, not the file."""
    lines = json_lines(path)
    try:
        return next(lines, None)
    finally:
        lines.close()


def _column_texts(batch, path: Path, field: str) -> list:
    names = batch.schema.names
    if field not in names:
        raise DataError(f'{path}: no column "{field}" (columns: {", ".join(names)}); set [data] text_field to '
                        f'the column that holds the text')
    return batch.column(names.index(field)).to_pylist()


def _rows(batches, start: int, path: Path, field: str) -> Iterator[Item]:
    """Items of record batches, skipping the first `start` rows; pos counts rows."""
    row = 0
    for batch in batches:
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        texts = _column_texts(batch, path, field)
        for i in range(max(0, start - row), n):
            text = texts[i]
            if isinstance(text, str):
                text = text.strip()
                if text:
                    yield Item(text, True, row + i + 1)
        row += n


def _read_parquet(path: Path, field: str, start: int) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    if field not in f.schema_arrow.names:
        raise DataError(f'{path}: no column "{field}" (columns: {", ".join(f.schema_arrow.names)}); set [data] '
                        f'text_field to the column that holds the text')
    groups, skipped = [], 0  # skip whole row groups before `start` without reading them
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if not groups and skipped + rows <= start:
            skipped += rows
        else:
            groups.append(g)
    if not groups:
        return
    batches = f.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=[field])
    for item in _rows(batches, start - skipped, path, field):
        yield item._replace(pos=item.pos + skipped)


def _read_arrow(path: Path, field: str, start: int) -> Iterator[Item]:
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _rows(reader, start, path, field)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path} is not an Arrow file written by datasets.save_to_disk ({e})") from None
    finally:
        source.close()


__all__ = ["DEFAULT_CORPUS", "DataError", "Item", "UndecodableBytesWarning", "UnreadableFileWarning", "default_corpus_path", "file_kind",
           "first_json_line", "is_data_file", "read_file"]
