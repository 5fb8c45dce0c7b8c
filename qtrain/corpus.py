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
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Iterator

DEFAULT_CORPUS = "default"
DEFAULT_CORPUS_VERSION = 1  # bump when the extraction below changes, so caches are rebuilt

# Standard-library modules whose docstrings form the default corpus (packages include their submodules).
# Fixed and sorted: the corpus must be the same text on every machine with the same Python version.
# Left out: modules with import side effects (this, antigravity, rlcompleter), GUI (tkinter, idlelib),
# tests, and modules deprecated for removal. All public docstrings of these give ~1.8 MB with the topics.
DEFAULT_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "bdb", "binascii", "bisect",
    "builtins", "bz2", "calendar", "cmd", "code", "codecs", "codeop", "collections", "colorsys",
    "concurrent", "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes",
    "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox",
    "marshal", "math", "mimetypes", "mmap", "multiprocessing", "netrc", "numbers", "opcode", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "pty", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep", "struct",
    "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc", "types",
    "typing", "unicodedata", "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


class DataError(ValueError):
    """A problem with the corpus, tokenizer or token files; the message says what to fix."""


class UndecodableBytesWarning(UserWarning):
    """A corpus file had bytes that are not UTF-8; they were skipped."""


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write chunks to path via a temp file in the same directory, fsync, then os.replace.

    A crash or a concurrent run never leaves a half-written cache file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique per writer
    try:
        with open(tmp, "xb") as f:  # mode 0666 & ~umask, like any file the user creates
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the default corpus ----------------------------------------------------------------------------------


def _module_docs(module) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module, its public classes/functions and their public methods."""
    found = [(module.__name__, inspect.getdoc(module))]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # keep objects defined here or in a C accelerator (posix for os, _collections for collections, ...)
        owner = getattr(obj, "__module__", None) or ""
        if owner != module.__name__ and not owner.startswith("_") and owner != "posix":
            continue
        found.append((f"{module.__name__}.{name}", inspect.getdoc(obj)))
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    found.append((f"{module.__name__}.{name}.{attr}", inspect.getdoc(member)))
    return [(qualname, doc) for qualname, doc in found if doc]


def _submodules(name: str) -> list:
    """The module and, for a package, its importable non-test submodules (recursive, sorted)."""
    try:
        module = importlib.import_module(name)
    except Exception:  # absent on this platform (e.g. asyncio.windows_events): skip
        return []
    out = [module]
    if hasattr(module, "__path__"):
        for info in sorted(pkgutil.iter_modules(module.__path__, name + "."), key=lambda i: i.name):
            if not {"test", "tests", "__main__"} & set(info.name.split(".")):
                out += _submodules(info.name)
    return out


def build_default_corpus() -> list[str]:
    """The embedded corpus as documents: one per pydoc topic (sorted), then one per module.

    Deterministic for a given Python version (~1.8 MB of text on 3.11) when run in a clean interpreter
    (see default_corpus_path); takes well under a second.
    """
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    seen: set[str] = set()  # a docstring appears once, under its first name (re-exports, inherited docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation warnings of stdlib modules (typing.io, ...) are not ours
        modules = [module for top in DEFAULT_MODULES for module in _submodules(top)]
        documented = [_module_docs(module) for module in modules]
    for found in documented:
        entries = []
        for qualname, doc in found:
            if doc not in seen:
                seen.add(doc)
                entries.append(f"{qualname}\n{doc}")
        if entries:
            docs.append("\n\n".join(entries).strip())
    return [d for d in docs if d]


def default_corpus_path(cache_root: Path) -> Path:
    """The cached JSONL of the default corpus, extracted at first use in a fresh, isolated interpreter.

    Not in this process: libraries imported here (torch, pytest, ...) patch stdlib functions such as
    inspect.getfile, which would change the extracted text. `python -I -S` sees only the stdlib.
    """
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_root / "corpus" / f"default-py{version}-v{DEFAULT_CORPUS_VERSION}.jsonl"
    if not path.exists():
        done = subprocess.run([sys.executable, "-I", "-S", __file__, str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"extracting the default corpus into {path} failed:\n{done.stderr[-2000:]}")
    return path


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


if __name__ == "__main__":  # python -I -S qtrain/corpus.py OUT.jsonl: see default_corpus_path
    write_atomic(Path(sys.argv[1]), (json.dumps({"text": d}).encode() + b"\n" for d in build_default_corpus()))
