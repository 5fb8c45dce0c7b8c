"""summary.md and summary.json of a tools/gpu_check.sh run, from its probes.jsonl and pytest.log.

    python tools/gpu_check_summary.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def table(probes: list[dict]) -> list[str]:
    rows = ["| variant | tok/s | step ms | host ms (queueing) | peak allocated GiB | estimate GiB | estimate error | "
            "error |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in probes:
        peak, est = r.get("peak_allocated_gib"), r.get("estimate_peak_allocated_gib")
        err = f"{100 * (est - peak) / peak:+.1f} %" if peak and est else ""
        rows.append(f"| {r.get('name', '')} | {r.get('tok_s', '')} | {r.get('step_ms', '')} | {r.get('host_ms', '')} | "
                    f"{peak or ''} | {est or ''} | {err} | {r.get('error', '').splitlines()[0][:120] if r.get('error') else ''} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    out = p.parse_args().out
    lines = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines() if line.strip()]
    probes = [r for r in lines if "kind" in r]
    stages = [r for r in lines if "stage" in r]
    pytest_log = out / "pytest.log"
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", pytest_log.read_text()) if pytest_log.exists() else []
    tests = ", ".join(f"{n} {what}" for n, what in counts) or "not run"
    md = ["# qtrain GPU check", "", f"CUDA kernel tests: {tests}", "",
          "Every qtrain row includes fit's grad-norm hook; captured rows: [train] cuda_graph = true (the 7B "
          "recipes' default), timed after warm-up and capture; peaks cover the whole process.", "",
          *table(probes), "", "| stage | exit | seconds |", "|---|---:|---:|",
          *(f"| {s['stage']} | {s.get('rc', 'skipped: ' + s.get('skipped', ''))} | {s.get('seconds', '')} |"
            for s in stages)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps({"tests": tests, "probes": probes, "stages": stages}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
