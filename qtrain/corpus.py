"""Training text as documents: the embedded default corpus and readers for user corpora.

A corpus is a sequence of documents (strings); qtrain.data packs their tokens with EOS after each.
`[data] corpus` selects the source:
    "default"          the embedded corpus: Python's pydoc topics plus docstrings of a fixed list of
                       standard-library modules (real English, available offline), extracted at first
                       use and cached as JSONL in the cache dir. It depends on the Python version.
    a text file        one document per file (blank lines inside it are kept as text); *.gz is unzipped.
    a directory        every *.txt and *.md below it, recursively, sorted by relative path; one
                       document per file.
    *.jsonl, *.jsonl.gz one document per line, from its "text" field; blank lines are skipped.
Non-UTF-8 input: undecodable bytes are skipped (dropped) and an `UndecodableBytesWarning` names the
file and the number of bytes dropped; the rest of the file is used. Documents are stripped of
surrounding whitespace and empty ones are dropped.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from typing import Iterator

from qtrain.default_corpus import default_corpus_path
from qtrain.errors import DataError

DEFAULT_CORPUS = "default"
class UndecodableBytesWarning(UserWarning):
    """A corpus file had bytes that are not UTF-8; they were skipped."""


# --- readers ---------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (gzip-decompressed for *.gz); undecodable bytes are skipped with a warning."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode("utf-8", errors="surrogateescape")  # each bad byte -> one lone surrogate U+DC80..U+DCFF
    clean = text.encode("utf-8", errors="ignore").decode("utf-8")  # drops exactly those surrogates
    if len(clean) != len(text):
        warnings.warn(
            f"{path}: skipped {len(text) - len(clean)} undecodable bytes (not UTF-8); "
            f"re-encode the file as UTF-8 to keep them",
            UndecodableBytesWarning,
            stacklevel=2,
        )
    return clean


def read_jsonl(path: Path) -> Iterator[str]:
    """The "text" field of each line of a .jsonl or .jsonl.gz file."""
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(
                f'{path}:{lineno}: no string "text" field; each line must look like {{"text": "..."}}'
            )
        yield record["text"]


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _raw_documents(corpus: str, cache_root: Path) -> Iterator[str]:
    if corpus == DEFAULT_CORPUS:
        yield from read_jsonl(default_corpus_path(cache_root))
        return
    path = Path(corpus).expanduser()
    if not path.exists():
        raise DataError(f'[data] corpus = "{corpus}": no such file or directory; give an existing path, '
                        f'or "default" for the embedded corpus')
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
        if not files:
            raise DataError(f'[data] corpus = "{corpus}": the directory has no .txt or .md files')
        for f in files:
            yield read_text(f)
    elif _is_jsonl(path):
        yield from read_jsonl(path)
    else:
        yield read_text(path)


def iter_documents(corpus: str, cache_root: Path, max_chars: int = 0) -> Iterator[str]:
    """Stripped, non-empty documents of `corpus`, cut to max_chars characters in total (0 = no limit).

    Lazy: each call re-reads the source. Raises DataError on a missing path, a bad JSONL line, or a
    corpus with no text at all (checked once the source is exhausted).
    """
    total = 0
    for doc in _raw_documents(corpus, cache_root):
        doc = doc.strip()
        if not doc:
            continue
        if max_chars and total + len(doc) >= max_chars:
            doc = doc[: max_chars - total]  # exactly max_chars in total (the cut may end in a space)
            total += len(doc)
            yield doc
            break
        total += len(doc)
        yield doc
    if total == 0:
        raise DataError(f'[data] corpus = "{corpus}" contains no text (empty after stripping whitespace); '
                        f'add text to it or point [data] corpus elsewhere')
