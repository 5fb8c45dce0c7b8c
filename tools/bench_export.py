"""Peak host memory of `qtrain export` against the size of what it writes, on an 8B-shaped model.

The model has Llama-3-8B's layer shape (hidden 4096, MLP 14336, 32 query / 8 key-value heads) with fewer
layers and a small vocabulary, so it fits a laptop: a run of it is trained for one step with `qtrain train`
(the tiny recipe, shape keys overridden), then exported by `qtrain export` in a fresh process that reports:
  imports   RSS once qtrain's export command and its libraries are imported (no model yet)
  loaded    RSS once the run's int8 model is loaded (load_trained)
  peak      the process's peak RSS (VmHWM) through the whole export
The export holds the int8 model and one float copy in the export dtype (qtrain.model.builder.dequantized_copy,
saved as it is by qtrain.hf.export.export_hf), so peak - imports should be about int8 model + output size.

    python tools/bench_export.py                       # 1 layer, bfloat16
    python tools/bench_export.py --layers 2 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_EXPORT = r"""
import json, sys
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from qtrain.cli import commands
from qtrain.cli.main import build_parser
imports = rss("VmRSS:")
r = commands.load_trained(sys.argv[1], "cpu")
loaded = rss("VmRSS:")
del r
args = build_parser().parse_args(["export", sys.argv[1], "--to", sys.argv[2], "--dtype", sys.argv[3]])
assert commands.cmd_export(args) == 0
print(json.dumps({"imports": imports, "loaded": loaded, "peak": rss("VmHWM:")}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--dir", help="work directory, kept with its run for the next measurement (default: a temporary one)")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.dir or tmp)
        run, out = work / "run", work / "hf"
        shape = [f"model.num_layers={a.layers}", f"model.hidden_size={a.hidden}",
                 f"model.intermediate_size={a.intermediate}", f"model.num_heads={a.heads}",
                 f"model.num_kv_heads={a.kv_heads}", "train.steps=1", "train.batch_size=1", "train.seq_len=16",
                 "train.eval_batches=1", "train.sample_tokens=0", "train.device=cpu", "optim.float_optimizer=adamw"]
        if not (run / "checkpoints").is_dir():  # --dir keeps the run for the next measurement
            subprocess.run([sys.executable, "-m", "qtrain", "train", "tiny", "--quiet", "--out", str(run),
                            *[x for s in shape for x in ("--set", s)]], check=True, env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", _EXPORT, str(run), str(out), a.dtype], check=True, env=env,
                              capture_output=True, text=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        output = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        int8 = m["loaded"] - m["imports"]
        extra = m["peak"] - m["imports"]
        mib = 2**20
        print(f"settings: {a.layers} layer(s), hidden {a.hidden}, intermediate {a.intermediate}, heads {a.heads}/"
              f"{a.kv_heads}, vocab 2048, export dtype {a.dtype}")
        print(f"output model.safetensors {output / mib:,.0f} MiB; int8 model (loaded RSS - imports RSS) "
              f"{int8 / mib:,.0f} MiB; imports {m['imports'] / mib:,.0f} MiB")
        print(f"export peak RSS {m['peak'] / mib:,.0f} MiB = imports + {extra / mib:,.0f} MiB = imports + "
              f"{extra / (output + int8):.2f} x (output + int8 model)")


if __name__ == "__main__":
    main()
