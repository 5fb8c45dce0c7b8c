"""Int8 projection GEMMs: fused dequant-GEMM vs dequantize-then-cuBLAS vs a plain bf16 weight, per shape.

For every projection shape of the given recipes (q/k/v/o and gate/up/down of one block) and every token
count M (batch x seq_len), times three ways of computing y = x Ŵᵀ (forward) and dx = dy Ŵ (input gradient):
  bf16 weight  F.linear / matmul with a stored bf16 weight: the floor (what an unquantized model pays)
  dequantize   [quant] matmul = "dequantize": dispatch.dequantize (Triton on CUDA) writes Ŵ in bf16, then cuBLAS
  fused        [quant] matmul = "fused": one Triton kernel, Ŵ dequantized tile by tile in registers (autotuned)
Time: triton.testing.do_bench (median, L2 cleared between runs) on CUDA. Memory: peak bytes allocated by one
call beyond its inputs and output (the dequantize path holds Ŵ). Then the sum over one training step's
projections (L layers, forward + input gradient; add one forward more with activation checkpointing),
and the ratios fused / dequantize and each / bf16 weight. Choose [quant] matmul from these.

    python tools/bench_matmul.py                         # 1b and 7b recipes, M = 256 and 2048, on CUDA
    python tools/bench_matmul.py --write-docs            # also the section of docs/performance.md
On a machine without CUDA it runs the kernels in Triton's interpreter (a smoke test of the script, with tiny
shapes by default): those timings say nothing about a GPU and are labelled so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (qtrain imports it)

import torch.nn.functional as F  # noqa: E402

from qtrain.config.recipe import TrainConfig  # noqa: E402
from qtrain.config.shipped import find_recipe  # noqa: E402
from qtrain.quant import dispatch, triton_kernels  # noqa: E402
from qtrain.quant.groupwise import quantize_groupwise  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import write_docs  # noqa: E402

PATHS = ("bf16 weight", "dequantize", "fused")


@dataclass
class Case:
    size: str
    name: str  # projection(s) of this shape, e.g. "q,k,v,o"
    count: int  # how many of them per block
    N: int  # out_features
    K: int  # in_features
    M: int  # tokens


def projection_shapes(cfg: TrainConfig) -> list[tuple[str, int, int, int]]:
    """(names, count per block, N, K) of one Llama block's projections."""
    m = cfg.model
    d, ff = m.hidden_size, m.intermediate_size
    kv = (m.num_kv_heads or m.num_heads) * (d // m.num_heads)
    attention = [("q,k,v,o", 4, d, d)] if kv == d else [("q,o", 2, d, d), ("k,v", 2, kv, d)]
    return attention + [("gate,up", 2, ff, d), ("down", 1, d, ff)]


def timer(device: torch.device, reps: int):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_time(fn):  # interpreter smoke test: a few calls, median
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return cpu_time


def extra_bytes(fn, device: torch.device) -> int | None:
    """Peak bytes one call allocates beyond what was allocated before it, its output included."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


def bench_case(case: Case, group_size: int, dtype: torch.dtype, device: torch.device, time_fn) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    w = torch.randn(case.N, case.K, generator=gen, device=device) * 0.02
    codes, scale, offset = quantize_groupwise(w, group_size)
    w_lp = w.to(dtype)
    del w
    x = torch.randn(case.M, case.K, generator=gen, device=device, dtype=dtype)
    dy = torch.randn(case.M, case.N, generator=gen, device=device, dtype=dtype)
    # "triton", not "auto": "auto" takes the dequantize path where the fused kernel is expected to lose
    # (triton_matmul.fused_expected_faster), and this benchmark is what checks that expectation
    q = (codes, scale, offset, group_size, "triton")
    fns = {
        ("forward", "bf16 weight"): lambda: F.linear(x, w_lp),
        ("forward", "dequantize"): lambda: dispatch.linear(x, *q, "dequantize"),
        ("forward", "fused"): lambda: dispatch.linear(x, *q, "fused"),
        ("grad input", "bf16 weight"): lambda: dy @ w_lp,
        ("grad input", "dequantize"): lambda: dispatch.linear_grad_input(dy, *q, "dequantize"),
        ("grad input", "fused"): lambda: dispatch.linear_grad_input(dy, *q, "fused"),
    }
    # the three paths compute the same product: check before timing (bf16 rounding of Ŵ and of the output)
    for op in ("forward", "grad input"):
        ref = fns[(op, "dequantize")]().float()
        got = fns[(op, "fused")]().float()
        rel = ((got - ref).norm() / ref.norm()).item()
        if rel > 1e-2:
            raise RuntimeError(f"{case.size} {case.name} M={case.M} {op}: fused differs from dequantize by {rel:.2e}")
    return {key: (time_fn(fn), extra_bytes(fn, device)) for key, fn in fns.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--sizes", default="1b,7b" if cuda else "tiny", help="comma-separated shipped recipes")
    p.add_argument("--tokens", default="256,2048" if cuda else "32",
                   help="comma-separated token counts M (batch x seq_len: 1x256 -> 256, 8x256 -> 2048)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--reps", type=int, default=3, help="timed calls per path in the CPU interpreter")
    p.add_argument("--write-docs", action="store_true", help="write the table to docs/performance.md")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if not triton_kernels.HAVE_TRITON:
        raise SystemExit("bench_matmul needs triton (pip install triton); the dequantize path alone is bench_step's")
    time_fn = timer(device, args.reps)

    rows, per_step = [], {}
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        cfg = TrainConfig.from_toml(find_recipe(size))
        g, L = cfg.quant.group_size, cfg.model.num_layers
        for M in [int(t) for t in args.tokens.split(",")]:
            totals = {path: 0.0 for path in PATHS}
            for name, count, N, K in projection_shapes(cfg):
                case = Case(size, name, count, N, K, M)
                res = bench_case(case, g, dtype, device, time_fn)
                for op in ("forward", "grad input"):
                    ms = {path: res[(op, path)][0] for path in PATHS}
                    mem = {path: res[(op, path)][1] for path in PATHS}
                    rows.append((case, op, ms, mem))
                    for path in PATHS:
                        totals[path] += L * count * ms[path]
                print(f"{size} M={M} {name} {N}x{K}: done", flush=True)
            per_step[(size, M)] = (L, totals)

    def mib(b):
        return "n/a" if b is None else f"{b / 2**20:.1f}"

    head = ["| size | projection | N x K | M | op | bf16 weight ms | dequantize ms | fused ms | fused / dequantize "
            "| fused / bf16 | extra MiB (bf16 / deq / fused) |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    table = head + [
        f"| {c.size} | {c.name} | {c.N}x{c.K} | {c.M} | {op} | {ms['bf16 weight']:.3f} | {ms['dequantize']:.3f} | "
        f"{ms['fused']:.3f} | {ms['fused'] / ms['dequantize']:.2f}x | {ms['fused'] / ms['bf16 weight']:.2f}x | "
        f"{mib(mem['bf16 weight'])} / {mib(mem['dequantize'])} / {mib(mem['fused'])} |"
        for c, op, ms, mem in rows]
    summary = [
        f"{size} M={M}: one step's projection GEMMs (forward + input gradient, {L} layers): "
        f"bf16 weight {t['bf16 weight']:.1f} ms, dequantize {t['dequantize']:.1f} ms, fused {t['fused']:.1f} ms; "
        f"fused / dequantize {t['fused'] / t['dequantize']:.2f}x, dequantize / bf16 "
        f"{t['dequantize'] / t['bf16 weight']:.2f}x, fused / bf16 {t['fused'] / t['bf16 weight']:.2f}x"
        for (size, M), (L, t) in per_step.items()]
    name = torch.cuda.get_device_name(device) if cuda else "CPU, Triton interpreter"
    settings = [f"settings: {name}, torch {torch.__version__}, triton {triton_kernels.triton.__version__}, "
                f"{args.dtype} activations, fp32 group metadata",
                "  time: triton.testing.do_bench median (ms)" if cuda else
                f"  time: median of {args.reps} interpreted calls: NOT a speed measurement (smoke test of the script)"]
    body = ["```", *settings, "```", "", *table, "", "```", *summary, "```"]
    print("\n".join(line for line in body if line != "```"))
    if args.write_docs:
        title = f"Int8 projection GEMMs: {name}" + ("" if cuda else " (not GPU numbers)")
        write_docs(title, body)
        print(f"wrote section '{title}'")


if __name__ == "__main__":
    main()
