"""The embedded default corpus: Python's pydoc topics plus docstrings of a fixed list of standard-library modules.

Real English that is available offline, extracted at first use in an isolated interpreter and cached as JSONL
in the cache dir. It depends on the Python version, so the cache file is keyed by it. Standard library only
(plus qtrain.core.atomic): the extraction imports this module with `python -I -S`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

from qtrain.core.atomic import write_atomic

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
        package_parent = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                f"from qtrain.data.default_corpus import write_default_corpus; write_default_corpus({str(path)!r})")
        done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"extracting the default corpus into {path} failed:\n{done.stderr[-2000:]}")
    return path


def write_default_corpus(out: str) -> None:
    """Extract the corpus into the JSONL file out (atomically); run by default_corpus_path in a clean interpreter."""
    write_atomic(Path(out), (json.dumps({"text": d}).encode() + b"\n" for d in build_default_corpus()))
