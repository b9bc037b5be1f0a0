#!/usr/bin/env python
"""Cold LoRA load: peftdeploy's resolver vs vLLM's own /v1/load_lora_adapter, same local adapter.

One CPU vLLM server (demo backbone, float32) with the peftdeploy plugin on. The recipe lists the same
local adapter under the names cold-1..cold-N; vLLM's API loads it under raw-1..raw-N. Every name is
new to the server, so every measurement is a real cold load from disk (a fresh LoRA int id).
Runs are interleaved (raw, cold, raw, cold, ...) after one warm-up of each path.

Measured per run:
* ``load_api``      POST /v1/load_lora_adapter (vLLM: add_lora into the engine)
* ``load_api_e2e``  load_api + the first completion (max_tokens 1) with that adapter
* ``resolver_e2e``  the first completion (max_tokens 1) naming the adapter: the plugin resolves it
                    (validate, locate, sha256-free local fetch, compatibility checks), vLLM add_lora, answer
* ``resolver``      resolver_e2e - median warm completion (the load part alone)

The headline ratio compares what a client waits for: resolver_e2e / load_api_e2e (both end with the
first answer); resolver / load_api is printed too.

    .venv/bin/python scripts/bench_plugin_load.py [--runs 5] [--adapter DIR] [--port 18330]
Writes out/bench_plugin_load.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _port(start: int) -> int:
    for p in range(start, 18390):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue
    raise SystemExit("no free port in 18300-18389")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--adapter", default=None, help="local adapter dir (default: demo://adapters/json, r16)")
    ap.add_argument("--port", type=int, default=18330)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_plugin_load.json"))
    args = ap.parse_args()

    from peftdeploy.demo import resolve_demo

    model = Path(resolve_demo("demo://smollm2-135m"))
    adapter = Path(args.adapter) if args.adapter else Path(resolve_demo("demo://adapters/json"))
    work = Path(tempfile.mkdtemp(prefix="bench-plugin-"))
    n = args.runs
    import yaml

    names = ["cold-warmup"] + [f"cold-{i}" for i in range(1, n + 1)]
    recipe = {"apiVersion": "peftdeploy/v1", "name": "bench-plugin",
              "backbone": {"model": str(model), "dtype": "float32"},
              "adapters": [{"name": nm, "source": str(adapter)} for nm in names],
              "policy": {"mode": "serve", "dynamic_loading": True},
              "serving": {"max_loras": 2, "max_cpu_loras": 2 * n + 4, "max_lora_rank": 16}}
    rp = work / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    port = _port(args.port)
    env = dict(os.environ, PEFTDEPLOY_RECIPE=str(rp), VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
               VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               PEFTDEPLOY_CACHE=str(work / "cache"))
    cmd = [sys.executable, "-m", "peftdeploy.launch.entry", "serve", str(model), "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--max-num-seqs", "8", "--enable-lora", "--max-loras", "2", "--max-cpu-loras", str(2 * n + 4),
           "--max-lora-rank", "16"]
    log = work / "server.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                print(log.read_text()[-5000:])
                raise SystemExit(f"vLLM exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 900:
                raise SystemExit("vLLM did not start")
            time.sleep(2)
        c = httpx.Client(timeout=300)

        def complete(model_name: str) -> float:
            t = time.perf_counter()
            r = c.post(url + "/v1/completions", json={"model": model_name, "prompt": "Hello", "max_tokens": 1,
                                                      "temperature": 0.0})
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"completion {model_name}: {r.status_code} {r.text}")
            return dt

        def load(name: str) -> float:
            t = time.perf_counter()
            r = c.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter)})
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"load {name}: {r.status_code} {r.text}")
            return dt

        # warm-up of both paths (first model inspection, first add_lora, first kernels)
        complete("base")
        load("raw-warmup")
        complete("raw-warmup")
        complete("cold-warmup")
        warm = [complete("cold-warmup") for _ in range(5)]
        rows = []
        for i in range(1, n + 1):
            la = load(f"raw-{i}")
            first = complete(f"raw-{i}")
            re2e = complete(f"cold-{i}")
            rows.append({"run": i, "load_api": la, "load_api_e2e": la + first, "resolver_e2e": re2e})
        w = statistics.median(warm)
        for r in rows:
            r["resolver"] = max(r["resolver_e2e"] - w, 0.0)
        med = {k: statistics.median(r[k] for r in rows) for k in ("load_api", "load_api_e2e", "resolver_e2e",
                                                                     "resolver")}
        ratio_e2e = med["resolver_e2e"] / med["load_api_e2e"]
        ratio_load = med["resolver"] / med["load_api"] if med["load_api"] else float("nan")
        print(f"adapter: {adapter}  (runs: {n}, warm completion median {w * 1000:.1f} ms)")
        print(f"{'run':>4} {'load_api':>10} {'load_api+1st':>13} {'resolver+1st':>13} {'resolver':>10}   (ms)")
        for r in rows:
            print(f"{r['run']:>4} {r['load_api'] * 1e3:>10.1f} {r['load_api_e2e'] * 1e3:>13.1f} "
                  f"{r['resolver_e2e'] * 1e3:>13.1f} {r['resolver'] * 1e3:>10.1f}")
        print(f"{'med':>4} {med['load_api'] * 1e3:>10.1f} {med['load_api_e2e'] * 1e3:>13.1f} "
              f"{med['resolver_e2e'] * 1e3:>13.1f} {med['resolver'] * 1e3:>10.1f}")
        print(f"ratio (cold load to first answer) resolver / load_lora_adapter = {ratio_e2e:.3f}  "
              f"(load part only: {ratio_load:.3f}); target <= 1.2")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "adapter": str(adapter), "runs": rows, "warm_completion_s": w,
            "median_s": med, "ratio_first_answer": ratio_e2e, "ratio_load_only": ratio_load,
            "target": 1.2, "ok": ratio_e2e <= 1.2}, indent=1))
        print(f"wrote {out}")
        return 0 if ratio_e2e <= 1.2 else 1
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
