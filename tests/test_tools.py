"""The benchmark scripts run end to end on CPU (their GPU figures come from running them on a GPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_matmul_smoke_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "tools/bench_matmul.py", "--tokens", "16", "--reps", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 6  # 3 shapes x (forward, grad input); each checked fused == dequantize before timing
    assert "NOT a speed measurement" in run.stdout
    assert re.search(r"tiny M=16: one step's projection GEMMs .* fused / dequantize \d+\.\d+x", run.stdout)


@pytest.mark.slow
def test_bench_step_smoke_on_cpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "tools/bench_step.py", "--device", "cpu", "--sizes", "tiny", "--points", "1x16",
           "--steps", "1", "--warmup", "1", "--matmul", "dequantize,fused"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    paths = [line.split("|")[4].strip() for line in run.stdout.splitlines() if line.startswith("| tiny |")]
    assert paths == ["qtrain", "qtrain fused", "bf16 floor", "apollo-torch"] * 2, paths  # progress, then summary
    assert "tiny 1x16: qtrain fused / bf16 floor: tokens/s" in run.stdout


@pytest.mark.slow
def test_bench_eval_smoke_on_cpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "tools/bench_eval.py", "--device", "cpu", "--layers", "2", "--hidden", "64",
           "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--seq-len", "32",
           "--windows", "5", "--batch-size", "2", "--tokens", "6"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in run.stdout.splitlines()
            if line.startswith("| eval") or line.startswith("| generate")}
    assert list(rows) == ["eval", "eval (before)", "eval (transformers)", "generate", "generate (before)",
                          "generate (transformers)"]
    losses = [float(v.split()[-1]) for k, v in rows.items() if k.startswith("eval")]
    assert max(losses) - min(losses) <= 1e-5 * losses[0], rows  # fp32 summation order only
    assert rows["generate (before)"] == "same tokens as `generate`"
    assert "model: 2 layers, hidden 64" in run.stdout
