"""Atomic file-system writes: a file or directory appears complete under its final name, or not at all.

Every writer in qtrain (checkpoints, token caches, tokenizers, metrics, exports, recipes) goes through
here: write a temp entry beside the target, fsync it, os.replace it into place, fsync the parent.
Temp entries start with TMP_PREFIX so a killed writer's leftovers can be found and swept.
Standard library only: the default-corpus extraction imports it in an isolated interpreter.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable

TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes the names created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A unique scratch name beside path (same file system, so os.replace is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: Path, chunks: Iterable[bytes] | bytes) -> None:
    """Write chunks (or one bytes object) to path via a temp file, fsync, os.replace, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # mode 0666 & ~umask, like any file the user creates
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_dir(src: Path, dst: Path) -> None:
    """Make the complete directory src visible as dst, replacing an existing dst; fsyncs the parent.

    os.replace cannot rename over a non-empty directory, so an existing dst is first renamed aside, src renamed
    in, and only then the old copy deleted. If renaming src in fails, the old dst is put back before re-raising.
    """
    if not dst.exists():
        os.replace(src, dst)
    else:
        aside = dst.with_name(f"{TMP_PREFIX}old-{dst.name}-{os.getpid()}")
        os.replace(dst, aside)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(aside, dst)
            raise
        shutil.rmtree(aside, ignore_errors=True)  # a leftover is scratch (.tmp-), swept by remove_scratch
    fsync_path(dst.parent)


_WRITER_PID = re.compile(r"[.-](\d+)(?:-[0-9a-f]{8})?$")  # temp_path / replace_dir name the writer's pid last


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_scratch(directory: Path) -> None:
    """Delete TMP_PREFIX leftovers of writers that were killed mid-write (files and directories).

    An entry whose writer (the pid in its name) is still running is left alone: caches are shared by
    concurrent runs, and their temp files are live until renamed.
    """
    if not directory.is_dir():
        return
    for p in directory.glob(f"{TMP_PREFIX}*"):
        m = _WRITER_PID.search(p.name)
        if m and int(m.group(1)) != os.getpid() and _alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
