"""A run directory owned by one process: validated, locked, and swept of killed writers' scratch files.

Two `qtrain train --out D` at once would interleave metrics and checkpoints: the first takes an exclusive
flock on D/.lock (released by the kernel when the process dies, so a killed run never leaves a stale lock)
and the second refuses, naming the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from qtrain.core.atomic import remove_scratch, write_atomic
from qtrain.errors import TrainingError

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.toml"
INIT_CONFIG_DIR = "init"  # the [model] init checkpoint's config.json, copied: the run's architecture


class RunDir:
    """Context manager: `with RunDir(path) as run:` holds the lock until the block ends."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> RunDir:
        p = self.path
        if p.exists() and not p.is_dir():
            raise TrainingError(f"--out {p} is a file; give a directory path for the run (it is created if missing)")
        try:
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise TrainingError(f"--out {p} is not writable; choose a directory you can write to") from None
        except OSError as e:
            raise TrainingError(f"--out {p} cannot be used as a run directory ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainingError(f"{p} is in use by another qtrain process (pid {holder}); wait for it to finish, "
                                f"stop it, or use --out NEW_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if not os.access(p, os.W_OK):
            self.__exit__()
            raise TrainingError(f"--out {p} is not writable; choose a directory you can write to")
        remove_scratch(p)  # leftovers of a writer killed mid-write (metrics rewrite, recipe, tokenizer)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def write_recipe(self, toml_text: str) -> None:
        write_atomic(self.path / RECIPE_FILE, toml_text.encode())

    def write_init_config(self, config_json: Path) -> None:
        write_atomic(self.path / INIT_CONFIG_DIR / "config.json", Path(config_json).read_bytes())
