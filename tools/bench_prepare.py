"""Benchmark `qtrain prepare`: throughput, peak memory and the second start, against one-thread encoding.

For each corpus layout it runs, in this one invocation:
  1. `qtrain prepare` in a fresh cache (a subprocess, every core), sampling the resident memory of its whole
     process tree (main process + tokenizing workers, summed) every 0.5 s;
  2. the baseline: one process, one thread, reading the same documents and encoding them with the same
     tokenizer (sentencepiece num_threads=1, ids into numpy), over the first --baseline-mb of text;
  3. the second start: `qtrain train` on the prepared shards (tiny model, log_every=1), timed from the
     process launch to its first logged step (imports, fingerprint, opening the shards, step-0 evaluation,
     one step).
Throughput is MB of document text (UTF-8) per second of wall time, process start-up included; the target
ratio is prepare / (cores x baseline) >= 0.8.

Layouts (the same documents in each, built from the embedded corpus's paragraphs recombined at random):
  jsonl-gz-dir   a directory of 8 .jsonl.gz shards        txt      one big .txt, documents apart by 2 blank lines
  jsonl-gz       one .jsonl.gz                            txt-dir  a directory of .txt files of ~100 kB each
The tokenizer is a sentencepiece BPE (--vocab pieces) trained once by qtrain's own trainer on a sample of the
corpus (its time and peak RSS are reported separately), then given to every prepare ([data] tokenizer).

With --defaults every [data] key stays at its default (the text layouts then split at every blank line, so
paragraphs are documents) instead of split_blank_lines = 2.

Usage: python tools/bench_prepare.py [--mb 1024] [--layouts jsonl-gz-dir,jsonl-gz,txt,txt-dir] [--vocab 32000]
       [--workdir DIR] [--corpus PATH --corpus-layout NAME] [--baseline-mb 64] [--keep] [--defaults]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qtrain.data.prepare import available_cores, encode_docs, pack  # noqa: E402
from qtrain.data.sources import DocumentStream, iter_documents, resolve_source  # noqa: E402
from qtrain.data.tokenizer import load_tokenizer  # noqa: E402

LAYOUTS = ("jsonl-gz-dir", "jsonl-gz", "txt", "txt-dir")
BLANK_LINES = {"txt": 2, "txt-dir": 2}  # [data] split_blank_lines of the text layouts (documents, not paragraphs)
DEFAULTS = False  # --defaults: every [data] key as the recipe leaves it (paragraphs are documents)


def blank_lines(layout: str) -> int:
    from qtrain.config.recipe import DataConfig

    return DataConfig().split_blank_lines if DEFAULTS else BLANK_LINES.get(layout, 0)


def blank_set(layout: str) -> list[str]:
    """The --set that gives a layout its split_blank_lines (none with --defaults)."""
    return [] if DEFAULTS else ["--set", f"data.split_blank_lines={BLANK_LINES.get(layout, 0)}"]


# --- the corpus ------------------------------------------------------------------------------------------


def documents(total_bytes: int, seed: int = 0):
    """Documents of 1 to 8 paragraphs of the embedded corpus, drawn at random, until total_bytes of text."""
    cache = Path(tempfile.gettempdir()) / "qtrain-bench-cache"
    paras = [p.strip() for d in iter_documents("default", cache) for p in d.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    done = 0
    while done < total_bytes:
        doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 8)))
        done += len(doc.encode())
        yield doc


def build(layout: str, out: Path, total_bytes: int) -> Path:
    """Write the corpus in `layout` under out; returns the path to give as [data] corpus."""
    out.mkdir(parents=True, exist_ok=True)
    docs = documents(total_bytes)
    if layout == "jsonl-gz":
        path = out / "corpus.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        return path
    if layout == "jsonl-gz-dir":
        files = [gzip.open(out / f"shard-{i:02d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) for i in range(8)]
        for i, d in enumerate(docs):  # round robin: every shard about the same size
            files[i % 8].write(json.dumps({"text": d}) + "\n")
        for f in files:
            f.close()
        return out
    if layout == "txt":
        path = out / "corpus.txt"
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(d + "\n\n\n")
        return path
    if layout == "txt-dir":
        n, size, f = 0, 0, None
        for d in docs:
            if f is None or size > 100_000:
                if f:
                    f.close()
                sub = out / f"{n // 1000:03d}"
                sub.mkdir(exist_ok=True)
                f, size = open(sub / f"doc-{n:06d}.txt", "w", encoding="utf-8"), 0
                n += 1
            f.write(d + "\n\n\n")
            size += len(d) + 3
        f.close()
        return out
    raise ValueError(layout)


# --- measuring -------------------------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (summed: shared pages are counted once per process)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_measured(cmd: list[str], env: dict, first_line: str | None = None) -> dict:
    """Run cmd; wall time, peak summed RSS of its process tree, and (optionally) the time of a stdout line."""
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak, seen, lines = [0], [None], []

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.5)  # memory moves by 8 M-character units: 0.5 s is fine, and the sampling costs little CPU

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line)
        if first_line and seen[0] is None and first_line in line:
            seen[0] = time.perf_counter() - t0
    proc.wait()
    sampler.join()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and its waited-for workers
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
    return {"seconds": time.perf_counter() - t0, "cpu_s": cpu, "peak_rss": peak[0], "first_line_s": seen[0],
            "output": lines}


def baseline(corpus: Path, layout: str, tokenizer_path: Path, limit_bytes: int) -> tuple[float, float, int]:
    """(MB/s, CPU s per MB, MB) of one process, one thread: read the documents and encode them."""
    tok = load_tokenizer(tokenizer_path)
    source = resolve_source(str(corpus), corpus.parent, split_blank_lines=blank_lines(layout))
    t0, c0 = time.perf_counter(), time.process_time()
    done, batch, size = 0, [], 0
    for doc in DocumentStream(source):
        batch.append(doc)
        size += len(doc.text)
        if size >= 1 << 20:
            encode_docs(tok, pack(batch), np.dtype(np.uint16), num_threads=1)
            done += sum(len(d.text.encode()) for d in batch)
            batch, size = [], 0
            if done >= limit_bytes:
                break
    if batch:
        encode_docs(tok, pack(batch), np.dtype(np.uint16), num_threads=1)
        done += sum(len(d.text.encode()) for d in batch)
    return done / (time.perf_counter() - t0) / 1e6, (time.process_time() - c0) / (done / 1e6), done


DATA_READY = """
import sys, time
from qtrain.config.recipe import TrainConfig
from qtrain.data.dataset import prepare_data
from qtrain.config.shipped import find_recipe
cfg = TrainConfig.from_toml(find_recipe("tiny"), sys.argv[1:])
t0 = time.perf_counter()
data = prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
t1 = time.perf_counter()
data.sampler(cfg.train.batch_size, cfg.train.seq_len, 0).batch_at(123456)
print(f"DATA_READY {t1 - t0:.4f} {time.perf_counter() - t1:.4f}")
"""


def text_bytes(corpus: Path, layout: str) -> int:
    source = resolve_source(str(corpus), corpus.parent, split_blank_lines=blank_lines(layout))
    return sum(len(d.text.encode()) for d in DocumentStream(source))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=1024, help="MB of text per layout (default 1024)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokenizer-sample-mb", type=int, default=50)
    ap.add_argument("--baseline-mb", type=float, default=64)
    ap.add_argument("--workdir", default=None, help="where corpora and caches go (default: a temp dir)")
    ap.add_argument("--corpus", help="use this corpus instead of building one (with --corpus-layout)")
    ap.add_argument("--corpus-layout", default="jsonl-gz", choices=LAYOUTS)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--defaults", action="store_true", help="leave every [data] key at its default (text layouts: "
                    "a blank line ends a document) instead of the layouts' split_blank_lines = 2")
    args = ap.parse_args()
    global DEFAULTS
    DEFAULTS = args.defaults
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qtrain-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cores = available_cores()
    qtrain = [sys.executable, "-m", "qtrain.cli.main"]
    layouts = [args.corpus_layout] if args.corpus else args.layouts.split(",")
    print(f"bench_prepare: {args.mb:g} MB of text per layout, {cores} cores, vocab {args.vocab}, work dir {work}")

    corpora = {}
    for layout in layouts:
        if args.corpus:
            corpora[layout] = Path(args.corpus)
            continue
        marker = work / "corpora" / f"{layout}-{args.mb:g}MB.done"  # a --workdir reused: the corpus is kept
        if marker.is_file():
            corpora[layout] = Path(marker.read_text())
            continue
        t0 = time.perf_counter()
        shutil.rmtree(work / "corpora" / layout, ignore_errors=True)
        corpora[layout] = build(layout, work / "corpora" / layout, int(args.mb * 1e6))
        marker.write_text(str(corpora[layout]))
        print(f"built {layout} in {time.perf_counter() - t0:.0f} s", flush=True)

    # the tokenizer: qtrain's own trainer on a sample of the first layout (timed separately)
    first = layouts[0]
    tok_cache = work / "tokenizer-cache"
    sets = ["--set", f"model.vocab_size={args.vocab}", "--set", f"data.tokenizer_sample_mb={args.tokenizer_sample_mb}",
            *blank_set(first)]
    r = run_measured(qtrain + ["prepare", "--quiet", "--set", f"data.corpus={corpora[first]}", "--set",
                               f"data.cache_dir={tok_cache}", "--set", f"data.max_corpus_chars={int(2 * args.tokenizer_sample_mb * 1e6)}",
                               *sets], env)
    tokenizer = next((tok_cache / "tokenizers").glob("*.model"))
    trained = next(line for line in r["output"] if line.startswith("tokenizer trained in"))
    print(f"tokenizer: {trained.strip()} (prepare of a {2 * args.tokenizer_sample_mb} M-character slice included: "
          f"{r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB)", flush=True)
    shutil.copy(tokenizer, work / "tokenizer.model")
    tokenizer = work / "tokenizer.model"

    rows = []
    for layout in layouts:
        corpus, cache = corpora[layout], work / f"cache-{layout}"
        shutil.rmtree(cache, ignore_errors=True)
        common = ["--set", f"data.corpus={corpus}", "--set", f"data.tokenizer={tokenizer}", "--set",
                  f"model.vocab_size={args.vocab}", "--set", f"data.cache_dir={cache}", *blank_set(layout)]
        text = text_bytes(corpus, layout)
        prep = run_measured(qtrain + ["prepare", "--quiet", *common], env)
        base_mb_s, base_cpu_mb, base_bytes = baseline(corpus, layout, tokenizer, int(args.baseline_mb * 1e6))
        done = next(line for line in prep["output"] if line.startswith("prepared "))
        pipeline_s = float(re.search(r" tokens in ([\d.]+) s", done).group(1))
        workers = int(re.search(r"(\d+) workers?\)", done).group(1))
        out = work / f"run-{layout}"
        shutil.rmtree(out, ignore_errors=True)
        second = run_measured(qtrain + ["train", "--out", str(out), *common, "--set", "train.steps=1", "--set",
                                        "train.log_every=1", "--set", "train.sample_tokens=0", "--set",
                                        "train.eval_batches=1", "--set", "train.save_every=0"], env, first_line="step 1/1")
        ready = run_measured([sys.executable, "-c", DATA_READY, *[a for a in common if a != "--set"]], env)
        open_s, batch_s = map(float, next(x for x in ready["output"] if x.startswith("DATA_READY")).split()[1:])
        on_disk = sum(f.stat().st_size for f in Path(corpus).rglob("*") if f.is_file()) if Path(corpus).is_dir() else Path(corpus).stat().st_size
        row = {"layout": layout, "text_mb": text / 1e6, "disk_mb": on_disk / 1e6, "prepare_s": prep["seconds"],
               "prepare_mb_s": text / 1e6 / prep["seconds"], "peak_rss_gib": prep["peak_rss"] / 2**30,
               "pipeline_s": pipeline_s, "pipeline_mb_s": text / 1e6 / pipeline_s, "workers": workers,
               "prepare_cpu_s_per_mb": prep["cpu_s"] / (text / 1e6),
               "baseline_mb_s": base_mb_s, "baseline_cpu_s_per_mb": base_cpu_mb, "baseline_mb": base_bytes / 1e6,
               "cores": cores, "ratio": text / 1e6 / prep["seconds"] / (cores * base_mb_s),
               "cpu_efficiency": base_cpu_mb / (prep["cpu_s"] / (text / 1e6)),
               "second_start_s": second["first_line_s"], "data_open_s": open_s, "first_batch_s": batch_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)

    print("\n| layout | text (on disk) | `qtrain prepare` wall (MB/s) | tokenizing pipeline (MB/s) | peak RSS, process tree "
          "| 1-thread baseline | wall ratio to cores x baseline | CPU s/MB: prepare vs baseline | second start: first step (data ready) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['text_mb']:.0f} MB ({r['disk_mb']:.0f} MB) | {r['prepare_s']:.0f} s "
              f"({r['prepare_mb_s']:.2f}) | {r['pipeline_s']:.0f} s ({r['pipeline_mb_s']:.2f}, {r['workers']} workers) | "
              f"{r['peak_rss_gib']:.2f} GiB | {r['baseline_mb_s']:.2f} MB/s ({r['baseline_mb']:.0f} MB) | "
              f"{r['ratio']:.2f} | {r['prepare_cpu_s_per_mb']:.3f} vs {r['baseline_cpu_s_per_mb']:.3f} "
              f"(efficiency {r['cpu_efficiency']:.2f}) | {r['second_start_s']:.1f} s ({r['data_open_s']:.3f} s) |")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
