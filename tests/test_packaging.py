"""The built wheel works on its own: a plain (non-editable) install finds its package data from any directory.

The tests elsewhere import qtrain from the source tree (or the editable install), where recipes/ sits beside
the package; this one builds the wheel, installs it into a bare folder and runs qtrain from a folder that is
not the repository, so a recipe left out of the package data, or a path computed from the source tree, fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the build reads is copied out first: building in place would write build/ and *.egg-info into the
# work tree. Everything else is left behind (tests, tools and docs are not in the wheel anyway).
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "runs",
                                    ".pytest_cache", ".ruff_cache", ".cache-ci", "shared")


def _run(args, cwd, env=None, timeout=120):
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{args[:4]} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_wheel_installs_and_finds_its_recipes_from_anywhere(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_COPIED, symlinks=True)
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)], cwd=tmp_path)
    (wheel,) = wheels.glob("qtrain-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], cwd=tmp_path)

    # Only the installed copy on the path: the editable install's finder comes after PYTHONPATH, and the
    # asserts below check that it was not the one used.
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = (
        "import sys; from pathlib import Path; import qtrain; from qtrain.config.shipped import find_recipe\n"
        "site = Path(sys.argv[1]).resolve()\n"
        "assert Path(qtrain.__file__).resolve().is_relative_to(site), qtrain.__file__\n"
        "for name in ('7b', 'tiny'):\n"
        "    path = find_recipe(name).resolve()\n"
        "    assert path.is_file() and path.is_relative_to(site), (name, path)\n"
    )
    _run([sys.executable, "-c", check, str(site)], cwd=elsewhere, env=env, timeout=60)

    out = _run([sys.executable, "-m", "qtrain.cli.main", "estimate", "7b", "--json"], cwd=elsewhere, env=env, timeout=90)
    report = json.loads(out.stdout)
    assert Path(report["recipe"]).resolve().is_relative_to(site.resolve()), report["recipe"]
