"""tools/gpu_check.sh, the one-call GPU check, without a GPU: its plan fits the call, the script and every command
in it parse (bash -n, the tools compiled and their command lines parsed by their own argparse: a typo would
otherwise surface only on the device), and its summary reads what the probes write."""

import json
import os
import py_compile
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


def script(*args) -> list[str]:
    run = subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHON": "python", "OUT": "/tmp/gpu-check-out"})
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_the_plan_fits_one_device_call():
    plan = [line.split() for line in script("--plan")]
    *stages, (total, seconds) = plan
    assert total == "total" and int(seconds) == sum(int(limit) for _, limit in stages) <= 330
    names = [name for name, _ in stages]
    assert names[:2] == ["setup", "kernel-tests"] and names[-1] == "summary"
    for wanted in ("7b", "7b-eager", "7b-8gb", "7b-8gb-eager", "7b-8gb-no-ckpt", "floor", "official"):
        assert wanted in names
    assert len(script("--files")) <= 6


def test_the_script_and_every_command_parse(tmp_path):
    assert subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=ROOT).returncode == 0
    commands = {}
    for line in script("--dry-run"):
        name, rest = line.split(" ", 1)
        commands[name] = rest.split(": ", 1)[1]
    for name, cmd in commands.items():
        assert subprocess.run(["bash", "-n", "-c", cmd], cwd=ROOT).returncode == 0, name
    argvs = [shlex.split(cmd) for cmd in commands.values() if cmd.startswith("python ")]
    pytest_cmd = next(a for a in argvs if a[1:3] == ["-m", "pytest"])
    files = [f for f in pytest_cmd if f.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files)
    tools = [" ".join(a[1:]) for a in argvs if a[1].startswith("tools/")]
    assert len(tools) == 8  # seven probes and the summary
    for path in {t.split()[0] for t in tools}:
        py_compile.compile(str(ROOT / path), doraise=True, cfile=str(tmp_path / "x.pyc"))
    run = subprocess.run([sys.executable, "-c", PARSE_ONLY], cwd=ROOT, input="\n".join(tools), capture_output=True,
                         text=True, timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.stdout.startswith("OK"), run.stdout + run.stderr[-2000:]


def test_the_summary_puts_measured_and_predicted_side_by_side(tmp_path):
    rows = [{"kind": "qtrain", "name": "7b-captured", "tok_s": 5000, "step_ms": 51.2, "host_ms": 0.4,
             "peak_allocated_gib": 10.0, "estimate_peak_allocated_gib": 10.5},
            {"kind": "official", "name": "official", "error": "ModuleNotFoundError: No module named 'apollo_torch'"},
            {"stage": "floor", "skipped": "20s left, needs 25s"}]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pytest.log").write_text("12 passed, 3 skipped in 40.1s\n")
    subprocess.run([sys.executable, "tools/gpu_check_summary.py", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=60)
    md = (tmp_path / "summary.md").read_text()
    assert "| 7b-captured | 5000 | 51.2 | 0.4 | 10.0 | 10.5 | +5.0 % |  |" in md
    assert "No module named 'apollo_torch'" in md and "skipped: 20s left, needs 25s" in md
    assert "CUDA kernel tests: 12 passed, 3 skipped" in md
