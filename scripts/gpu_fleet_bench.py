#!/usr/bin/env python3
"""GPU run of issue 21: the adapter-aware fleet (issue 20) on one host with 2 GPUs, vs the same 2 GPUs as
identical multi-LoRA engines, in one run, both behind the same router (vllm-router, as `peftdeploy up`).

Setup (as scripts/gpu_bench.py, whose assets it builds): a Llama-3-8B-shaped model with dummy weights
(``--load-format dummy``), 8 random rank-16 all-linear adapters l0..l7, traffic Zipf(--zipf, default 1.6:
l0 ≈ 55%, where the planner predicts the merged group helps most on 2 engines: s = 1 / (1 + active ratio)),
declared as ``policy.traffic`` in the recipe so the planner sees the workload it will get.

Variants (each: 2 engines, one per GPU, CUDA_VISIBLE_DEVICES from the fleet planner, router in front):
* ``fleet``  — ``fleet: {replicas: 2, dedicated: auto}``: the planner's groups (l0 merged on an engine of
  its own when its share fills an engine, the rest on a multi-LoRA engine). With dummy weights the merged
  model is the same dummy model (as gpu_bench's "merged"), so the merged engine runs with no LoRA.
* ``shared`` — ``fleet: {replicas: 2, dedicated: []}``: both engines serve every adapter (the baseline).

Engines are planned and started by peftdeploy's own code (plan.make_plan -> launch.fleet.plan_engines ->
start_fleet: the planner's flags, the router registration by model id); the only change is the merged
engine's model directory (the dummy model instead of a merge of dummy weights). Load: peftdeploy.bench,
closed loop, --concurrency in flight (default 128 = 64 per engine), 200-word prompts, 128 output tokens,
a warm-up, then --runs measured runs; median output tok/s.

Output: $OUT/gpu_fleet_bench.json (+ .md): per variant the groups, the devices, output tok/s per run and
median, TTFT/TPOT p50; the ratio fleet / shared measured and the planner's predicted ratio (fleet.gain).

    PY=python3 OUT=out/gpu-fleet bash scripts/gpu_fleet_bench.sh            # on the 2-GPU machine
    python3 scripts/gpu_fleet_bench.py --dry-run                            # the plan and commands only
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftdeploy.bench import report  # noqa: E402
from peftdeploy.bench.client import run_workload_sync  # noqa: E402
from peftdeploy.bench.workload import WorkloadConfig, build_workload, model_shares  # noqa: E402


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "scripts" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_recipe(path: Path, a: argparse.Namespace, names: list[str], dedicated: str) -> Path:
    shares = model_shares(WorkloadConfig(adapters=tuple(names), zipf_alpha=a.zipf, concurrency=a.concurrency))
    lines = ["apiVersion: peftdeploy/v1", f"name: fleet-{path.stem}", "backbone:", f"  model: {a.model_dir}",
             "  dtype: bfloat16", f"  max_model_len: {a.max_model_len}", "adapters:"]
    lines += [f"  - {{name: {n}, source: {Path(a.lora_dir) / f'lora{i}'}}}" for i, n in enumerate(names)]
    lines += ["policy:", "  mode: auto", "  dynamic_loading: false", "  traffic:"]
    lines += [f"    {n}: {shares[n]:.6f}" for n in names]
    lines += ["serving:", "  host: 127.0.0.1", f"  port: {a.port}", f"  gpu_memory_utilization: {a.gpu_memory_utilization}",
              f"  max_num_seqs: {a.max_num_seqs}", f"  max_lora_rank: {a.rank}", "  extra_args:", "    load_format: dummy",
              f"    max_num_batched_tokens: {a.max_num_batched_tokens}",
              "fleet:", f"  replicas: {a.replicas}", f"  dedicated: {dedicated}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu-fleet")
    ap.add_argument("--model-dir", default="/tmp/m")
    ap.add_argument("--lora-dir", default="/tmp/loras")
    ap.add_argument("--n-loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.6)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=640)
    ap.add_argument("--warmup-requests", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--variants", default="fleet,shared")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--dry-run", action="store_true", help="plan both variants and print the engines, run nothing")
    a = ap.parse_args()
    out = Path(a.out)
    names = [f"l{i}" for i in range(a.n_loras)]
    gb = _gpu_bench()
    out.mkdir(parents=True, exist_ok=True)
    gb.make_model(Path(a.model_dir))  # also for --dry-run: the planner inspects the config and adapters
    if not (Path(a.lora_dir) / f"lora{a.n_loras - 1}" / "adapter_model.safetensors").exists():
        gb.make_adapters(Path(a.lora_dir), a.n_loras, a.rank, Path(a.model_dir))
    from peftdeploy.launch.fleet import Router, plan_engines, start_fleet, stop_fleet
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    result: dict = {"config": dict(vars(a)), "variants": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    wl = WorkloadConfig(adapters=tuple(names), zipf_alpha=a.zipf, concurrency=a.concurrency,
                        input_len=a.input_len, output_len=a.output_len, num_requests=a.num_requests)
    for v in [x for x in a.variants.split(",") if x]:
        rec = write_recipe(out / "recipes" / f"{v}.yaml", a, names, "auto" if v == "fleet" else "[]")
        loaded = load_recipe(rec)
        gpu_mem = None if not a.dry_run else 143771 << 20  # --dry-run without a GPU: plan for an H200
        if a.dry_run:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(a.replicas)))
        plan = make_plan(loaded, device="cuda", gpu_memory=gpu_mem)
        engines, rhost, rport = plan_engines(loaded, plan, device="cuda", port=None, host=None, gpu_memory=gpu_mem)
        for e in engines:  # dummy weights: the merged model is the dummy model itself (no merge step)
            if e.spec.merge is not None:
                e.spec = dataclasses.replace(e.spec, model=str(a.model_dir), merge=None)
        info = {"fleet": plan.fleet.to_dict(), "engines": [
            {"name": e.name, "models": e.models, "devices": e.devices, "command": e.spec.command_line()} for e in engines]}
        result["variants"][v] = info
        log(f"{v}: {plan.fleet.reason}")
        for e in info["engines"]:
            log(f"  {e['name']} GPUs {e['devices']}: {', '.join(e['models'])}")
        if a.dry_run:
            continue
        router = Router(rhost, rport, out / "logs" / v / "router.log")
        try:
            secs = start_fleet(engines, router, log_dir=out / "logs" / v, timeout=a.timeout)
            info["ready_s"] = round(secs, 1)
            base = router.base_url
            # the base model is not in the traffic: every request names an adapter (served or merged)
            run_workload_sync(base, build_workload(dataclasses.replace(wl, num_requests=a.warmup_requests, seed=1000)))
            runs = []
            for i in range(a.runs):
                w = build_workload(dataclasses.replace(wl, seed=i))
                summary = report.summarize(run_workload_sync(base, w), w)
                runs.append({**summary["overall"], "errors": summary["error_messages"]})
            info["runs"] = runs
            toks = [x.get("output_tok_s") or 0.0 for x in runs]
            info["output_tok_s"] = statistics.median(toks)
            log(f"{v}: output tok/s {', '.join(f'{t:.0f}' for t in toks)} (median {info['output_tok_s']:.0f})")
        finally:
            stop_fleet(engines, router)
        report.write_json(result, out / "gpu_fleet_bench.json")
    if not a.dry_run and all("output_tok_s" in result["variants"].get(v, {}) for v in ("fleet", "shared")):
        f, s = result["variants"]["fleet"], result["variants"]["shared"]
        result["measured_ratio"] = f["output_tok_s"] / s["output_tok_s"]
        result["predicted_ratio"] = f["fleet"]["predicted"] / s["fleet"]["predicted"]
        md = ["| variant | groups | output tok/s (median) | vs shared |", "|---|---|---|---|"]
        for name, x in (("shared", s), ("fleet", f)):
            groups = "; ".join(f"{g['name']} ({g['kind']}, {g['replicas']}×)" for g in x["fleet"]["groups"])
            md.append(f"| {name} | {groups} | {x['output_tok_s']:.0f} | {x['output_tok_s'] / s['output_tok_s']:.2f}× |")
        md.append(f"\nmeasured fleet/shared {result['measured_ratio']:.2f}× vs predicted {result['predicted_ratio']:.2f}×")
        (out / "gpu_fleet_bench.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        report.write_json(result, out / "gpu_fleet_bench.json")
    elif a.dry_run:
        print(json.dumps(result["variants"], indent=1, default=str)[:20000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
