#!/usr/bin/env python3
"""peftdeploy's CPU LoRA kernels vs vLLM's, against the merged deployment, in one command (issue 15).

    .venv/bin/python scripts/bench_lora_kernels_cpu.py            # recipes/demo.yaml, ~12 min on 2 cores

One machine, one run, servers one at a time (port 18400 by default), each from the recipe's LaunchSpec
(peftdeploy.bench.deploy.variant, as `peftdeploy bench --compare` does):

* merged: demo-merged's deployment (the hottest adapter merged with peftdeploy's merge engine; no LoRA);
* LoRA servers (all adapters preloaded, max_loras = N) with ``PEFTDEPLOY_LORA_KERNELS=vllm`` (vLLM's
  punica ops, eager as vLLM-CPU runs every LoRA model) and with peftdeploy's kernels (the default:
  segment GEMMs, the LoRA model compiled like the merged one, lora_kernels/cpu_compile.py), each
  measured with base-only traffic, 1 adapter, and N adapters Zipf(1.0). ``--eager`` adds a fourth
  server: peftdeploy's kernels with ``PEFTDEPLOY_LORA_COMPILE=0`` (eager, as vLLM-CPU would run it).

Same requests for every setup (peftdeploy.bench.workload, concurrency 8), one warm-up, then ``runs``
measured runs, medians. Prints the table (ratio vs merged) and writes out/bench_lora_kernels_cpu.json
+ .png; ``--docs`` copies both into docs/bench/cpu/.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftdeploy.bench import report  # noqa: E402
from peftdeploy.plan.kernels import installed_vllm_version  # noqa: E402
from peftdeploy.bench.client import run_workload_sync  # noqa: E402
from peftdeploy.bench.compare import Setup, _row, hottest_first, ratio_rows  # noqa: E402
from peftdeploy.bench.deploy import Server, merge_adapters, recipe_spec, variant  # noqa: E402
from peftdeploy.bench.workload import WorkloadConfig, build_workload  # noqa: E402
from peftdeploy.plan.kernels import ENV  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("--out", default=str(REPO / "out"))
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--docs", action="store_true", help="copy the JSON/PNG into docs/bench/cpu/")
    ap.add_argument("--eager", action="store_true",
                    help="also a peftdeploy-kernels server with PEFTDEPLOY_LORA_COMPILE=0 (the LoRA model eager)")
    ap.add_argument("--servers", default="",
                    help="comma-separated subset of merged,vllm,peftdeploy,peftdeploy-eager (merged is always run: "
                         "it is the baseline); default all")
    a = ap.parse_args()
    if not 18300 <= a.port <= 18499:
        ap.error("use a port in 18300-18499")
    out = Path(a.out)
    work = out / "bench_lora_kernels_cpu"
    work.mkdir(parents=True, exist_ok=True)
    spec, loaded = recipe_spec(a.recipe, port=a.port)
    adapters = hottest_first(loaded.recipe)
    n = len(adapters)
    base_name = spec.served_model_name
    t0 = time.time()
    merged_model = merge_adapters(loaded, [adapters[0]])
    print(f"merged: {adapters[0]} merged with peftdeploy.merge ({time.time() - t0:.1f} s): {merged_model}", flush=True)

    zipf = f"{n} adapters zipf{a.zipf:g}"
    servers = [  # key, env, setups
        ("merged", {}, [Setup("merged", "merged", False, (), None, f"no LoRA, {adapters[0]} merged")]),
        ("vllm", {ENV: "vllm"}, [
            Setup("vllm kernels: base traffic", "vllm", True, (), n, "LoRA on, requests to the base model"),
            Setup("vllm kernels: 1 adapter", "vllm", True, (adapters[0],), n, f"all to {adapters[0]}"),
            Setup(f"vllm kernels: {zipf}", "vllm", True, tuple(adapters), n, f"Zipf over {', '.join(adapters)}"),
        ]),
        ("peftdeploy", {ENV: "peftdeploy"}, [
            Setup("peftdeploy kernels: base traffic", "peftdeploy", True, (), n, "LoRA on, requests to the base"),
            Setup("peftdeploy kernels: 1 adapter", "peftdeploy", True, (adapters[0],), n, f"all to {adapters[0]}"),
            Setup(f"peftdeploy kernels: {zipf}", "peftdeploy", True, tuple(adapters), n,
                  f"Zipf over {', '.join(adapters)}"),
        ]),
    ]
    if a.eager:  # the same kernels in the LoRA model run eagerly, as vLLM-CPU runs LoRA models (cpu_compile.py)
        servers.append(("peftdeploy-eager", {ENV: "peftdeploy", "PEFTDEPLOY_LORA_COMPILE": "0"}, [
            Setup(f"peftdeploy eager: {s.name.split(': ', 1)[1]}", "peftdeploy-eager", True, s.adapters, n,
                  s.description + ", PEFTDEPLOY_LORA_COMPILE=0") for s in servers[-1][2]]))

    if a.servers:
        keep = {"merged", *a.servers.split(",")}
        unknown = keep - {k for k, _, _ in servers}
        if unknown:
            ap.error(f"--servers: unknown {sorted(unknown)} (known: {[k for k, _, _ in servers]})")
        servers = [x for x in servers if x[0] in keep]

    def wl(setup: Setup, k: int, seed: int) -> WorkloadConfig:
        return WorkloadConfig(adapters=setup.adapters, base_model=base_name, zipf_alpha=a.zipf,
                              base_share=0.0 if setup.adapters else 1.0, num_requests=k,
                              concurrency=a.concurrency, output_len=a.output_len, seed=seed)

    results, info = [], {}
    for key, env, setups in servers:
        if setups[0].lora:
            sspec = variant(spec, adapters=adapters, max_loras=n, port=a.port)
        else:
            sspec = variant(spec, adapters=None, model=merged_model, served_model_name=base_name, port=a.port,
                            mode="merge")
        print(f"[{key}] starting ({env or 'no LoRA'}): {sspec.command_line()}", flush=True)
        srv = Server(sspec, log_path=work / f"server_{key}.log", env=env)
        with srv:
            log = (work / f"server_{key}.log").read_text(errors="replace")
            line = next((x.split("peftdeploy: ", 1)[1] for x in log.splitlines() if "peftdeploy: LoRA kernels:" in x
                         and "compiled" not in x), None)
            print(f"[{key}] ready in {srv.ready_s:.0f} s; {line or 'no LoRA kernels line'}", flush=True)
            info[key] = {"argv": srv.argv(), "env": env, "ready_s": srv.ready_s, "kernels_log": line}
            for setup in setups:
                run_workload_sync(srv.url, build_workload(wl(setup, a.warmup, 1000)))
                summaries = []
                for i in range(a.runs):
                    w = build_workload(wl(setup, a.num_requests, i))
                    s = report.summarize(run_workload_sync(srv.url, w), w)
                    summaries.append(s)
                    o = s["overall"]
                    print(f"  {setup.name} run {i + 1}/{a.runs}: {o['output_tok_s']:.1f} out tok/s, TPOT p50 "
                          f"{(o['tpot_s']['p50'] or 0) * 1000:.1f} ms, errors {o['errors']}", flush=True)
                row = _row(setup, report.median_summary(summaries), summaries)
                row["env"] = env
                results.append(row)
    ref = results[0]
    for x in results:
        x["ratio"] = x["output_tok_s"] / ref["output_tok_s"] if ref.get("output_tok_s") else None
    result = {
        "recipe": a.recipe, "recipe_name": loaded.recipe.name, "merged_model": merged_model,
        "workload": dataclasses.asdict(wl(servers[-1][2][-1], a.num_requests, 0)), "runs": a.runs,
        "servers": info, "results": results, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vllm_version": installed_vllm_version(),
        "targets": {f"{zipf}": 0.85, "1 adapter": 0.9},
    }
    pj = report.write_json(result, out / "bench_lora_kernels_cpu.json")
    pp = report.plot_compare(results, out / "bench_lora_kernels_cpu.png",
                             title=f"{loaded.recipe.name} on CPU: LoRA kernels vs merged (median of {a.runs} runs)",
                             vllm_version=result["vllm_version"])
    head, rows = ratio_rows(results)
    print()
    print(report.format_table(head, rows, title=f"{loaded.recipe.name} (CPU): concurrency {a.concurrency}, "
                              f"{a.num_requests} requests, {a.output_len} output tokens, median of {a.runs} runs"))
    print(f"\nwrote {pj}" + (f" and {pp}" if pp else ""))
    if a.docs:
        dst = REPO / "docs" / "bench" / "cpu"
        dst.mkdir(parents=True, exist_ok=True)
        for p in (pj, pp):
            if p:
                shutil.copy2(p, dst / Path(p).name)
        print(f"copied into {dst}")
    return 1 if sum(r.get("errors", 0) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
