#!/usr/bin/env python3
"""Tables and the plot of the GPU LoRA-kernel run (issue 15) from the JSON the device calls wrote:

    .venv/bin/python scripts/gpu_kernels_report.py [RUN_DIR [EARLIER_RUN_DIR]]

Reads RUN_DIR/lora_kernels_bench.json (scripts/gpu_lora_kernels.py --bench: µs per layer, peftdeploy vs
vLLM) and RUN_DIR/servers_call*.json (scripts/gpu_bench.py: out tok/s through the server), prints the
markdown tables of docs/bench/gpu-kernels.md and writes gpu-kernels.png into RUN_DIR. Per-layer vLLM
figures missing from RUN_DIR (its kernel call had no vLLM) come from EARLIER_RUN_DIR, which also gives
the "before" column; the tables say so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "bench" / "gpu-kernels"
    earlier = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    kb = json.loads((d / "lora_kernels_bench.json").read_text())
    calls = [json.loads(p.read_text()) for p in sorted(d.glob("servers_call*.json"))]
    c2 = next(c for c in calls if c.get("gpu"))
    merged = next(r["output_tok_s"] for c in calls for r in c["setups"] if r["server"] == "merged")
    rows = [r for c in calls for r in c["setups"] if "output_tok_s" in r]
    before = {}
    if earlier is not None:
        before = {(r["shape"], r["T"]): r for r in json.loads((earlier / "lora_kernels_bench.json").read_text())["bench"]}
    for r in kb["bench"]:
        b = before.get((r["shape"], r["T"]), {})
        r["before_us"] = b.get("peftdeploy_us")
        if "vllm_us" not in r and "vllm_us" in b:
            r["vllm_us"], r["vllm_earlier"] = b["vllm_us"], True
            r["speedup"] = r["vllm_us"] / r["peftdeploy_us"]
    print(f"vLLM {c2['vllm']}, {c2['gpu']}\n")
    print("| setup | out tok/s (median of 2) | runs | ratio vs merged | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['output_tok_s']:.0f} | {' / '.join(f'{x:.0f}' for x in r['runs_tok_s'])} | "
              f"**{r['output_tok_s'] / merged:.2f}** | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
              f"{r['tpot_p50'] * 1e3:.1f} / {r['tpot_p99'] * 1e3:.1f} |")
    mark = " (earlier lease)" if any(r.get("vllm_earlier") for r in kb["bench"]) else ""
    print(f"\n| layer | tokens | peftdeploy µs | peftdeploy before µs | vLLM µs{mark} | vLLM / peftdeploy | "
          "memory floor µs |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(kb["bench"], key=lambda r: (r["T"], list("qogd").index(r["shape"][0]))):
        bf = f"{r['before_us']:.1f}" if r.get("before_us") else "-"
        print(f"| {r['shape']} | {r['T']} | {r['peftdeploy_us']:.1f} | {bf} | {r.get('vllm_us', float('nan')):.1f} | "
              f"{r.get('speedup', float('nan')):.2f} | {r['floor_us']:.1f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no PNG)")
        return 0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    short = {"merged": "merged\n(no LoRA)", "plain_pd": "8 adapters\npeftdeploy\nkernels",
             "pd_mix": "8 adapters\npeftdeploy\nkernels", "pd_ds": "8 adapters\npeftdeploy\n+ dual stream",
             "plain_vllm": "8 adapters\nvLLM\nkernels", "many_auto_pd": "64 adapters\nplanner auto\npeftdeploy",
             "many_ml8_pd": "64 adapters\nmax_loras 8\npeftdeploy", "many_ml8_vllm": "64 adapters\nmax_loras 8\nvLLM",
             "many_auto_vllm": "64 adapters\nplanner auto\nvLLM"}
    labels = [short.get(r["server"], r["server"]) if r["adapters"] or r["server"] == "merged"
              else "LoRA on,\nbase traffic\n(peftdeploy)" for r in rows]
    vals = [r["output_tok_s"] for r in rows]
    colors = ["#888888" if r["server"] == "merged" else "#d62728" if "vllm" in r["server"] else "#1f77b4"
              for r in rows]
    bars = a1.bar(range(len(rows)), vals, color=colors)
    for b, v in zip(bars, vals):
        a1.text(b.get_x() + b.get_width() / 2, v, f"{v / merged:.2f}x", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(range(len(rows)), labels, fontsize=7.5, rotation=0)
    a1.set_ylabel("output tokens/s (higher is better)")
    a1.set_title("Server throughput, 64 streams (ratio to merged)", fontsize=10)
    ks = [r for r in kb["bench"] if r["T"] in (16, 64, 256, 8192) and "vllm_us" in r]
    ks.sort(key=lambda r: (r["T"], list("qogd").index(r["shape"][0])))
    x = range(len(ks))
    a2.bar([i - 0.2 for i in x], [r["vllm_us"] for r in ks], 0.4, label="vLLM punica kernels" + mark,
           color="#d62728")
    a2.bar([i + 0.2 for i in x], [r["peftdeploy_us"] for r in ks], 0.4, label="peftdeploy kernels", color="#1f77b4")
    a2.set_yscale("log")
    a2.set_xticks(list(x), [f"{r['shape']}\n{r['T']}" for r in ks], fontsize=6.5)
    a2.set_ylabel("µs per LoRA layer (log; lower is better)")
    a2.set_title("Per-layer kernel time, 8 adapters r16 (layer, tokens)", fontsize=10)
    a2.legend(fontsize=8)
    fig.suptitle(f"LoRA kernels on {c2['gpu'].split(',')[0]}, vLLM {c2['vllm']}, Llama-3-8B shape", fontsize=11)
    fig.tight_layout()
    fig.savefig(d / "gpu-kernels.png", dpi=130)
    print(f"\nwrote {d / 'gpu-kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
