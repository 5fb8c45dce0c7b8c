"""tools/gpu_check.sh, the prepared GPU check, without a GPU: its dry run, and every command line it runs
parsed by the tool's own argparse (a typo in an option would otherwise surface only on the device)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs each tool's main() until its ArgumentParser has parsed the command line, then stops (exit 0); an
# argparse error exits 2 with its message. One process for all tools: torch and transformers import once.
PARSE_ONLY = r"""
import argparse, runpy, sys
real = argparse.ArgumentParser.parse_args
class Parsed(Exception):
    pass
def parse_then_stop(self, *args, **kwargs):
    real(self, *args, **kwargs)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_then_stop
sys.path.insert(0, "tools")
bad = []
for line in sys.stdin.read().splitlines():
    argv = line.split()
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        bad.append(f"{line}: main() ran past its parser")
    except Parsed:
        pass
    except SystemExit as e:
        bad.append(f"{line}: argparse exit {e.code}")
print("BAD" if bad else "OK", *bad, sep="\n")
"""


def dry_run(*args) -> list[str]:
    run = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHON": "python"})
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_both_parts_dry_run_and_every_tool_command_parses():
    lines = dry_run("part1") + dry_run("part2")
    names = [line.split(",")[0].lstrip("[") for line in lines]
    assert names == ["kernel-tests", "profile-7b", "profile-7b-8gb", "bench-update", "bench-matmul", "bench-step",
                     "validate-estimator"]
    limits = [int(line.split("limit ")[1].split("s]")[0]) for line in lines]
    assert sum(limits[:3]) <= 300 and sum(limits[3:]) <= 300  # each part fits one 5-minute device call
    commands = [shlex.split(line.split("] ", 1)[1]) for line in lines]
    pytest_cmd = commands[0]
    assert pytest_cmd[:3] == ["python", "-m", "pytest"] and "-k" in pytest_cmd
    assert all((ROOT / f).is_file() for f in pytest_cmd if f.startswith("tests/"))
    tools = [" ".join(c[1:]) for c in commands[1:]]
    graph = dry_run("part3")  # the cuda_graph step bench, a device call of its own
    assert [line.split(",")[0].lstrip("[") for line in graph] == ["bench-step-graph"]
    tools += [" ".join(shlex.split(line.split("] ", 1)[1])[1:]) for line in graph]
    assert all(t.startswith("tools/") for t in tools)
    run = subprocess.run([sys.executable, "-c", PARSE_ONLY], cwd=ROOT, input="\n".join(tools), capture_output=True,
                         text=True, timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.stdout.startswith("OK"), run.stdout + run.stderr[-2000:]


def test_an_unknown_check_is_refused():
    run = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "run", "no-such-check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "unknown check 'no-such-check'" in run.stderr
