import os
import sys
from pathlib import Path

import pytest
import torch

from qtrain.config.recipe import ModelConfig, QuantConfig

# Triton fixes interpreted vs compiled mode when it is first imported, and qtrain imports it with the
# package: without a GPU, set interpreter mode before any test module imports qtrain, so the kernels'
# CPU tests run in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the cores: each computes with its share of them (two intra-op threads per
# worker on 2 cores spin against each other), and so do the processes the tests start.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# What every rank of start_ranks imports: once, in the fork server, instead of in each rank (~7 s of CPU each)
RANK_PRELOAD = ["torch", "torch.distributed", "transformers.models.llama.modeling_llama", "qtrain.train.run",
                "qtrain.parallel.fsdp"]


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """mp.spawn(fn, args, nprocs), the ranks forked from a server process that imported RANK_PRELOAD once (it
    ran no computation, so no OpenMP thread pool is forked). Each rank still gets a process of its own."""
    import torch.multiprocessing as mp

    mp.set_forkserver_preload(RANK_PRELOAD)  # used when this process starts its fork server (its first call)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small CPU workloads: two intra-op threads mostly spin against each other (and against other processes
    on a 2-core machine, many times slower); one thread computes and allocates the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_cfg(**over) -> ModelConfig:
    """A 2-layer, hidden-64 Llama [model] section (the other keys at their recipe defaults)."""
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=0,
                max_seq_len=32, rope_theta=10000.0, init_std=0.02, rms_norm_eps=1e-6, tie_embeddings=False,
                attn_implementation="sdpa", float_dtype="float32")
    return ModelConfig(**{**base, **over})


def quant_cfg(enabled=True, group_size=64, meta_dtype="float32") -> QuantConfig:
    return QuantConfig(enabled=enabled, group_size=group_size, meta_dtype=meta_dtype)


def release_trainer(cfg):
    """A CPU model and its release-mode Updater for cfg, as fit trains them (checkpointing as the recipe says)."""
    from qtrain.model.builder import build_model, enable_activation_checkpointing
    from qtrain.update.build import build_updater
    from qtrain.update.release import attach_release

    model = build_model(cfg.model, cfg.quant, "cpu", seed=0)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    updater = build_updater(model, cfg)
    attach_release(updater)
    return model, updater


# ---- Triton kernels: interpreter on CPU, compiled on CUDA ------------------------------------------------
def triton_interpreted() -> bool:
    from qtrain.quant import triton_kernels
    return triton_kernels.interpret_mode()


@pytest.fixture(params=[
    pytest.param("cpu", marks=pytest.mark.skipif(
        not triton_interpreted(),
        reason="triton was imported compiled: run_cpu_cases_in_interpreter runs these in a fresh process")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        triton_interpreted() or not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA GPU")),
])
def kernel_device(request):
    """Where a Triton-kernel test runs: "cpu" in Triton's interpreter, or "cuda" compiled."""
    return torch.device(request.param)


@pytest.fixture
def device(kernel_device):
    """The kernel tests' device: "cpu" (Triton's interpreter) or "cuda" (compiled)."""
    return kernel_device


def interpreter_process_test(test_file: str):
    """The test a kernel-test module binds to `test_cpu_cases_in_an_interpreter_process`: where this process
    imported Triton compiled (a GPU machine), it runs the module's "cpu" cases in an interpreter process."""
    @pytest.mark.skipif(triton_interpreted(), reason="the cpu cases ran in this process")
    def test_cpu_cases_in_an_interpreter_process():
        run_cpu_cases_in_interpreter(test_file)
    return test_cpu_cases_in_an_interpreter_process


def run_cpu_cases_in_interpreter(test_file: str) -> None:
    """Run test_file's "cpu" kernel cases in a fresh process with TRITON_INTERPRET=1 (a process that imported
    triton compiled, i.e. a GPU machine, cannot switch to the interpreter) and assert they all passed."""
    import re
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           "-k", "cpu and not interpreter_process"]
    run = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]  # "<n> passed, <k> deselected in <t>s"
    assert re.match(r"\d+ passed, \d+ deselected in", summary), summary


# compiled code without a GPU: Triton compiles for sm_90 on any machine (ptxas ships with the wheel)
SM90_PRELUDE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget

def ptx(fn, signature, constexprs, **options):
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"enable_fp_fusion": False, **options}  # what the launchers pass
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
"""


def compile_for_sm90(script: str, tmp_path) -> dict[str, str]:
    """Run SM90_PRELUDE + script (which prints a JSON {name: ptx}) in a fresh, compiled-mode process."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", SM90_PRELUDE + script], env=env, cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def closed_loop_grad(w: torch.Tensor, t: int, seed_base: int) -> torch.Tensor:
    """A toy gradient for optimizer tests: depends on the weight (closed loop) plus fresh noise every step t;
    each test module draws its own noise stream (seed_base)."""
    g = torch.Generator().manual_seed(seed_base + t)
    return 0.5 * w + torch.randn(w.shape, generator=g)
