"""Step time, tokens/s and peak memory of qtrain's training step against two bf16 baselines, per size and batch.

Rows per (size, batch point): qtrain once per --matmul mode, the bf16 floor, apollo-torch. Same LlamaConfig
(qtrain.model.builder.llama_config of the size's recipe), same batches (uniform random token ids from a seeded generator: speed and memory only, no corpus), same
activation checkpointing (transformers' non-reentrant gradient checkpointing, on unless --no-checkpointing):
  qtrain       build_model (int8 projections) -> build_updater -> attach (layer-wise release), the recipe as
               shipped; a step is begin_step, lm_loss, backward, finish_step (qtrain.train.run.fit without logging).
               Autocast dtype --dtype. "qtrain" = [quant] matmul "dequantize", "qtrain fused" = "fused".
  bf16 floor   the same transformers Llama with --dtype parameters and no optimizer: every gradient is freed
               in a register_post_accumulate_grad_hook the moment it is final. Eager. The fastest a step
               that still computes every gradient can be.
  apollo-torch --dtype weights, APOLLO-Mini layer-wise from the apollo-torch package: one APOLLOAdamW per
               parameter, stepped and zeroed in its post-accumulate-grad hook. Projections: rank 1, scale 128,
               scale_type tensor, proj random, update_proj_gap 200, proj_type std; embedding, norms, lm_head:
               a plain APOLLOAdamW group (AdamW). Its norm-growth limiter calls Python max() on a device
               scalar, one host sync per projection.
LR: the recipe's [optim] lr for the matrices, float_lr for the rest, constant (timing only).
Time per step: perf_counter around one step with torch.cuda.synchronize() before and after on CUDA; median
over --steps after --warmup steps. tokens/s = batch * seq_len / median.
Memory: on CUDA torch.cuda.max_memory_allocated / max_memory_reserved since a reset made before the model is
built (so weights, optimizer state and activations all count), everything freed between configs. On CPU
there is no allocator peak: "n/a". "persistent" = bytes of the model's parameters and buffers plus every
optimizer state tensor after the last step, summed from the tensors (dtype.itemsize), on every device.
Host syncs (CUDA only, qtrain/core/sync_probe.py): one extra step under torch.cuda.set_sync_debug_mode("warn"),
counting the warnings, plus explicit synchronize calls (torch.cuda.synchronize, Stream/Event.synchronize,
bitsandbytes' sync_gpu), which that mode does not report; for qtrain also one step under "error" mode that
also fails on any explicit synchronize: pass/fail.

    python tools/bench_step.py                                   # 60m, 1b, 7b at 1x256 and 8x256 on CUDA
    python tools/bench_step.py --device cpu --sizes tiny,60m --points 1x64 --write-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from qtrain.config.recipe import TrainConfig
from qtrain.config.shipped import find_recipe
from qtrain.core.sync_probe import count_syncs, sync_free
from qtrain.model.builder import build_model, enable_activation_checkpointing, is_quantized_projection, llama_config
from qtrain.model.loss import lm_loss
from qtrain.quant import triton_kernels
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release
from qtrain.update.step_graph import CapturedStep

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

# quoted, H100, from the issue ("Speed: a sync-free, fused GPU step"): reference constants, not measured here.
# (size, batch, seq_len) -> "official": (Q-APOLLO tokens/s, peak GiB); "floor": (bf16 floor tokens/s, how it ran).
QUOTED = {
    ("7b", 1, 256): {"official": (355, 11.56), "floor": (3074, "")},
    ("7b", 8, 256): {"floor": (8526, " with activation checkpointing")},
    ("1b", 1, 256): {"official": (598, 2.68)},
}


@dataclass
class Row:
    size: str
    batch: int
    seq_len: int
    path: str
    times: list[float] = field(default_factory=list)  # seconds per timed step
    peak_alloc: int | None = None  # bytes, CUDA only
    peak_reserved: int | None = None
    persistent: int = 0  # bytes of model tensors + optimizer state after the last step
    syncs: str = "n/a"  # host syncs in one step, CUDA only
    sync_check: str = ""  # qtrain only: PASS/FAIL under set_sync_debug_mode("error")
    error: str = ""  # "OOM: ..." when the path did not fit

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.median


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def tensor_bytes(*objects) -> int:
    """Bytes of every tensor in (nested) dicts/lists, and tensor attributes of other objects (projectors)."""
    total, seen = 0, set()

    def visit(v) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            if v.device.type != "meta" and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.dtype.itemsize
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, type)):
            for x in vars(v).values():
                visit(x)

    for obj in objects:
        visit(obj)
    return total


def model_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def float_llama(model_cfg, device: torch.device, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """The plain transformers Llama in `dtype`, built on meta and allocated once on device (no fp32 copy).

    Init as qtrain's: linears and embedding N(0, init_std), norms 1 (one generator, values do not matter
    for speed, but finite ones keep every kernel on its normal path).
    """
    config = llama_config(model_cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)  # (every parameter in dtype)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # fp32 inv_freq, computed on meta before
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, model_cfg.init_std, generator=gen)
    return model


def apollo_torch_hooks(model: torch.nn.Module, lr: float, float_lr: float) -> list:
    """One apollo-torch APOLLOAdamW per parameter, stepped and zeroed in its post-accumulate-grad hook."""
    from apollo_torch import APOLLOAdamW

    optimizers = []
    for name, p in model.named_parameters():
        if is_quantized_projection(name.removesuffix(".weight")):
            group = dict(params=[p], rank=1, proj="random", scale_type="tensor", scale=128, update_proj_gap=200,
                         proj_type="std")
            opt = APOLLOAdamW([group], lr=lr, weight_decay=0.0)
        else:  # embedding, norms, lm_head: a group without "rank" is plain AdamW
            opt = APOLLOAdamW([p], lr=float_lr, weight_decay=0.0)

        def hook(p, opt=opt):
            opt.step()
            opt.zero_grad(set_to_none=True)

        p.register_post_accumulate_grad_hook(hook)
        optimizers.append(opt)
    return optimizers


def run_path(row: Row, build: Callable[[], tuple[Callable[[], object], Callable[[], int], bool]], args,
             device: torch.device) -> None:
    """Build one path, time it, read its memory; everything it built is freed on return."""
    free_memory(device)
    try:
        step, persistent, check_sync = build()
        for _ in range(args.warmup):
            step()
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            row.times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            row.peak_alloc = torch.cuda.max_memory_allocated(device)
            row.peak_reserved = torch.cuda.max_memory_reserved(device)
            row.syncs = str(count_syncs(step))
            if check_sync:
                row.sync_check = sync_free(step)
        row.persistent = persistent()
    except torch.OutOfMemoryError as e:
        row.error = f"OOM: {str(e).splitlines()[0][:80]}"
    except ImportError as e:  # apollo-torch is a test extra, not a qtrain dependency
        row.error = f"{e}; install it with pip install -e '.[test]'"
    finally:
        step = persistent = None
        free_memory(device)


def qtrain_path(matmul: str) -> str:
    return "qtrain" if matmul == "dequantize" else f"qtrain {matmul}"


def bench_point(size: str, cfg: TrainConfig, batch: int, seq_len: int, args, device: torch.device) -> list[Row]:
    """Rows: qtrain once per --matmul mode, then the bf16 floor and apollo-torch."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), generator=gen).to(device)  # (B, T+1)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each
    o = cfg.optim
    graph = " cuda_graph" if cfg.train.cuda_graph else ""
    qtrain_cfgs = {qtrain_path(m) + graph: dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, matmul=m))
                   for m in args.matmul}
    rows = [Row(size, batch, seq_len, name) for name in (*qtrain_cfgs, "bf16 floor", "apollo-torch")]

    def checkpointed(model):
        if args.checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        return model

    def build_qtrain(cfg: TrainConfig):
        torch.manual_seed(cfg.train.seed)
        model = checkpointed(build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed))
        updater = build_updater(model, cfg)
        if cfg.train.release:
            attach_release(updater)
        # [train] cuda_graph: eager warm-up, then the capture in the last untimed step, then one replay per step
        captured = (CapturedStep(model, updater, device, dtype, warmup=max(1, args.warmup - 1))
                    if cfg.train.cuda_graph else None)

        def step():
            updater.begin_step(o.lr, o.float_lr_value)
            if captured is not None:
                return captured(x, y)
            loss = lm_loss(model, x, y, dtype)
            loss.backward()  # release: every tensor is updated and its gradient freed in here
            updater.finish_step()
            return loss

        def persistent():
            floats = [opt.state for opt in updater.float_opts.values()]
            return model_bytes(model) + tensor_bytes(updater.state, floats)

        return step, persistent, True

    def build_floor():
        model = checkpointed(float_llama(cfg.model, device, dtype, cfg.train.seed))
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))  # no optimizer

        def step():
            loss = lm_loss(model, x, y, dtype)
            loss.backward()
            return loss

        return step, lambda: model_bytes(model), False

    def build_apollo_torch():
        model = checkpointed(float_llama(cfg.model, device, dtype, cfg.train.seed))
        optimizers = apollo_torch_hooks(model, o.lr, o.float_lr_value)

        def step():
            loss = lm_loss(model, x, y, dtype)
            loss.backward()  # every parameter is stepped in its hook
            return loss

        return step, lambda: model_bytes(model) + tensor_bytes([opt.state for opt in optimizers]), False

    builds = [functools.partial(build_qtrain, c) for c in qtrain_cfgs.values()] + [build_floor, build_apollo_torch]
    for row, build in zip(rows, builds):
        run_path(row, build, args, device)
    return rows


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[Row], checkpointing: bool) -> list[str]:
    out = ["| size | batch x seq | ckpt | path | median ms | tokens/s | peak alloc GiB | peak reserved GiB "
           "| persistent MiB | host syncs/step |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.size} | {r.batch}x{r.seq_len} | {checkpointing} | {r.path} | {r.error} | | | | | |")
            continue
        out.append(f"| {r.size} | {r.batch}x{r.seq_len} | {checkpointing} | {r.path} | {r.median * 1e3:.1f} "
                   f"| {r.tokens_per_s:,.0f} | {gib(r.peak_alloc)} | {gib(r.peak_reserved)} "
                   f"| {r.persistent / 2**20:,.1f} "
                   f"| {r.syncs} |")
    return out


def ratio_lines(rows: list[Row], device: torch.device) -> list[str]:
    out = []
    points: dict[tuple[str, int, int], list[Row]] = {}
    for r in rows:
        points.setdefault((r.size, r.batch, r.seq_len), []).append(r)
    for (size, batch, seq_len), point in points.items():
        floor = next(r for r in point if r.path == "bf16 floor")
        ref = next(r for r in point if r.path == "apollo-torch")
        head = f"{size} {batch}x{seq_len}:"
        for q in (r for r in point if r.path.startswith("qtrain")):
            if q.error:
                out.append(f"{head} {q.path} {q.error}")
                continue
            for other, label in ((floor, "bf16 floor"), (ref, "apollo-torch APOLLO-Mini")):
                if other.error:
                    out.append(f"{head} {q.path} / {label}: {label} {other.error}")
                    continue
                mem = (f", peak alloc {q.peak_alloc / other.peak_alloc:.2f}x" if q.peak_alloc and other.peak_alloc
                       else f", persistent {q.persistent / other.persistent:.2f}x")
                out.append(f"{head} {q.path} / {label}: tokens/s {q.tokens_per_s / other.tokens_per_s:.2f}x{mem}")
            if device.type == "cuda":
                out.append(f"{head} no host-device sync in a {q.path} step (set_sync_debug_mode('error') and no "
                           f"explicit synchronize, logging excluded): {q.sync_check}")
            quoted = QUOTED.get((size, batch, seq_len))
            if quoted:
                note = "" if device.type == "cuda" else " (this run is on CPU: the ratios below are not meaningful)"
                out.append(f"{head} quoted, H100, from the issue{note}:")
                if "official" in quoted:
                    tps, peak = quoted["official"]
                    mem = f", peak alloc {q.peak_alloc / 2**30 / peak:.2f}x" if q.peak_alloc else ""
                    out.append(f"  official Q-APOLLO {tps:,} tokens/s at {peak} GiB -> {q.path} / official: "
                               f"tokens/s {q.tokens_per_s / tps:.2f}x{mem}")
                if "floor" in quoted:
                    tps, how = quoted["floor"]
                    measured = "" if floor.error else f"; measured floor / quoted floor {floor.tokens_per_s / tps:.2f}x"
                    out.append(f"  bf16 floor{how} {tps:,} tokens/s -> {q.path} / quoted floor: "
                               f"tokens/s {q.tokens_per_s / tps:.2f}x{measured}")
    return out


def write_docs(section_title: str, body: list[str]) -> None:
    """Replace (or append) the `## section_title` section of docs/performance.md; other sections stay."""
    preamble = ["# Performance", "",
                "Generated by `tools/bench_step.py` and `tools/bench_matmul.py`; each section is one device and "
                "lists the settings it ran with.",
                "Numbers from different devices are not comparable.", ""]
    sections: list[list[str]] = []
    if DOCS.exists():
        lines = DOCS.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        preamble = lines[:start]
        for line in lines[start:]:
            if line.startswith("## "):
                sections.append([line])
            else:
                sections[-1].append(line)
    new = [f"## {section_title}", ""] + body + [""]
    for i, sec in enumerate(sections):
        if sec[0] == new[0]:
            sections[i] = new
            break
    else:
        sections.append(new)
    DOCS.write_text("\n".join(preamble + [line for sec in sections for line in sec]).rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="60m,1b,7b",
                   help="comma-separated shipped recipes (tiny, 60m, 130m, 350m, 1b, 7b)")
    p.add_argument("--points", default="1x256,8x256", help="comma-separated BATCHxSEQ_LEN points")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="run without activation checkpointing (default: on for every path)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="baseline parameter dtype and qtrain's autocast dtype ([train] dtype)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override for the qtrain path of every size, repeatable")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--matmul", default=None,
                   help="comma-separated [quant] matmul modes, one qtrain row each (default dequantize,fused on "
                        "CUDA; dequantize on CPU, where the fused kernel does not run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3 on CUDA, 2 on CPU: oneDNN builds its bf16 kernels early)")
    p.add_argument("--max-cpu-params", type=float, default=100e6,
                   help="on CPU, skip sizes with more parameters than this (a 7B step does not fit a CPU run)")
    p.add_argument("--write-docs", action="store_true",
                   help="write the table to docs/performance.md (always done on CUDA; on CPU only with this flag)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (10 if cuda else 5)
    args.matmul = [m.strip() for m in (args.matmul or ("dequantize,fused" if cuda else "dequantize")).split(",")]
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    points = [tuple(int(v) for v in pt.lower().split("x")) for pt in args.points.split(",")]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    rows: list[Row] = []
    notes: list[str] = []
    recipes: dict[str, str] = {}
    t_start = time.perf_counter()
    for size in sizes:
        recipe = find_recipe(size)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config(
                TrainConfig.from_toml(recipe).model)).parameters())
        if not cuda and n_params > args.max_cpu_params:
            notes.append(f"skipped {size}: {n_params / 1e6:,.0f}M params > --max-cpu-params "
                         f"{args.max_cpu_params / 1e6:,.0f}M on CPU (run it on a GPU)")
            print(notes[-1], flush=True)
            continue
        for batch, seq_len in points:
            cfg = TrainConfig.from_toml(recipe, args.overrides + [
                f"train.batch_size={batch}", f"train.seq_len={seq_len}", f"train.device={device.type}",
                f"train.dtype={args.dtype}", f"train.activation_checkpointing={str(args.checkpointing).lower()}"])
            o, q = cfg.optim, cfg.quant
            recipes[size] = (f"{recipe.name}: {n_params / 1e6:,.1f}M params, {o.method} {dict(o.args)}, lr {o.lr}, "
                             f"int8 group {q.group_size} {q.rounding} (kernels {q.kernels}), "
                             f"float tensors {cfg.model.float_dtype} with {o.float_optimizer}, "
                             f"release {cfg.train.release}")
            new = bench_point(size, cfg, batch, seq_len, args, device)
            rows += new
            for line in table(new, args.checkpointing)[2:]:
                print(line, flush=True)

    if cuda:
        dev_name = torch.cuda.get_device_name(device)
        memory_rule = "torch.cuda.max_memory_allocated / max_memory_reserved, reset before each path is built"
    else:
        dev_name = f"CPU, {torch.get_num_threads()} threads"
        load = f", load average {os.getloadavg()[0]:.1f} at the end (a shared CPU: timings are noisy)"
        memory_rule = "no allocator peak on CPU (n/a); persistent = summed tensor bytes"
    triton_version = triton_kernels.triton.__version__ if triton_kernels.HAVE_TRITON else "not installed"
    settings = [
        f"settings: device={device.type} ({dev_name}{'' if cuda else load}), torch {torch.__version__}, "
        f"triton {triton_version}",
        f"  dtype {args.dtype} (baseline parameters, qtrain autocast), activation checkpointing {args.checkpointing}, "
        f"warmup {args.warmup}, timed {args.steps} steps per path, median",
        "  data: uniform random token ids (seeded), the same batch every step and path",
        f"  memory: {memory_rule}",
        *[f"  {size}: {text}" for size, text in recipes.items()],
        f"  overrides: {' '.join(args.overrides) or 'none'}",
        "  apollo-torch: APOLLOAdamW per parameter in post-accumulate-grad hooks; rank 1, scale 128, scale_type "
        "tensor, proj random, update_proj_gap 200, proj_type std; AdamW for embedding, norms, lm_head",
        *[f"  {n}" for n in notes],
    ]
    body = ["```", *settings, "```", "", *table(rows, args.checkpointing), "", "```",
            *ratio_lines(rows, device),
            *([] if cuda else ["no host-device sync check: needs CUDA (torch.cuda.set_sync_debug_mode)"]), "```"]
    print()
    print("\n".join(line for line in body if line != "```"))
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    if cuda or args.write_docs:
        title = dev_name if cuda else f"CPU smoke test ({dev_name}): not GPU numbers"
        title += f" ({' '.join(args.overrides)})" if args.overrides else ""  # its own section
        write_docs(title, body)
        print(f"wrote section '{title}' of {DOCS}")


if __name__ == "__main__":
    main()
