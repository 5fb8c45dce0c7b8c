"""The repository cites only files it ships: no reference to documents outside the clone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("qtrain", "tests", "tools", "docs", "recipes")
SCANNED_FILES = ("README.md", "pyproject.toml")
# Built by concatenation so that this file does not match its own needles.
NEEDLES = (".." + "/shared", "shared" + "/specs")
SPEC_SECTION = re.compile(r"\b" + "spec" + r" §")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(path)
    return files


def test_no_reference_outside_the_repo():
    offenders = []
    for path in scanned_files():
        raw = path.read_bytes()
        if b"\0" in raw:
            continue  # binary file
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in NEEDLES) or SPEC_SECTION.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not offenders, (
        "references to documents outside the repository (cite docs/algorithms.md §N instead):\n"
        + "\n".join(offenders)
    )
