#!/usr/bin/env python
"""Time-to-ready of `peftdeploy up RECIPE` vs the bare `peftdeploy-vllm serve` with the same arguments.

Both are measured the same way: from just before the process is started until GET /health is 200
and /v1/models lists every model of the plan (polled every 0.1 s). `up` is started with --detach
and stopped with `peftdeploy down`; the bare server is stopped by SIGTERM to its process group.
Runs alternate (up, bare, up, bare, ...) so that a drift of the machine's load hits both alike.

    python scripts/bench_up_ready.py [RECIPE] [--runs 3] [--port 18090] [--out out/bench_up_ready.json]

Prints a table and writes JSON with every run, the medians and their ratio (up / bare).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ready(base: str, models: list[str]) -> bool:
    try:
        if httpx.get(base + "/health", timeout=1).status_code != 200:
            return False
        r = httpx.get(base + "/v1/models", timeout=2)
        ids = {m["id"] for m in r.json()["data"]}
        return all(m in ids for m in models)
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def wait_ready(base: str, models: list[str], proc: subprocess.Popen | None, timeout: float) -> float | None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if ready(base, models):
            return time.monotonic()
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            return None
        time.sleep(0.1)
    return None


def wait_port_free(host: str, port: int, timeout: float = 60) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return
        except OSError:
            time.sleep(0.2)
        finally:
            s.close()


def run_up(recipe: Path, port: int, base: str, models: list[str], log_dir: Path, i: int, timeout: float) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "peftdeploy.cli", "up", str(recipe), "--detach", "--json",
                             "--port", str(port), "--log-file", str(log_dir / f"up-{i}.log")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t_ready = wait_ready(base, models, proc, timeout)
    out, _ = proc.communicate(timeout=timeout)
    name = json.loads(out)["name"] if out.strip().startswith("{") else None
    if name:
        subprocess.run([sys.executable, "-m", "peftdeploy.cli", "down", name], env=env, capture_output=True,
                       timeout=120)
    if t_ready is None:
        raise SystemExit(f"up run {i} did not become ready; see {log_dir / f'up-{i}.log'}")
    return t_ready - t0


def run_bare(spec, port: int, base: str, models: list[str], log_dir: Path, i: int, timeout: float) -> float:
    from peftdeploy.launch.supervisor import server_env, server_executable, stop_process_group

    argv = spec.argv(tuple(server_executable()))
    with open(log_dir / f"bare-{i}.log", "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=server_env(spec), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        t_ready = wait_ready(base, models, proc, timeout)
    stop_process_group(proc.pid, grace=20, proc=proc)
    if t_ready is None:
        raise SystemExit(f"bare run {i} did not become ready; see {log_dir / f'bare-{i}.log'}")
    return t_ready - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "demo.yaml"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_up_ready.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peftdeploy.launch.local import override_port
    from peftdeploy.plan import make_plan
    from peftdeploy.recipe import load_recipe

    recipe = Path(args.recipe).resolve()
    plan = make_plan(load_recipe(recipe))
    plan.raise_for_errors()
    spec = override_port(plan.launch, args.port)
    if spec.merge is not None and not Path(spec.model).is_dir():
        raise SystemExit("merge recipe: run `peftdeploy up` once first so the merged model exists")
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "") else spec.host
    base = f"http://{host}:{args.port}"
    models = spec.model_names
    out = Path(args.out)
    log_dir = out.parent / "bench_up_ready_logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    up_t, bare_t = [], []
    for i in range(args.runs):
        for kind in ("up", "bare"):
            wait_port_free(host, args.port)
            t = (run_up(recipe, args.port, base, models, log_dir, i, args.timeout) if kind == "up"
                 else run_bare(spec, args.port, base, models, log_dir, i, args.timeout))
            (up_t if kind == "up" else bare_t).append(t)
            print(f"run {i + 1}/{args.runs} {kind:4s} {t:7.2f} s", flush=True)
            time.sleep(2)

    mu, mb = statistics.median(up_t), statistics.median(bare_t)
    ratio = mu / mb
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    res = {"recipe": str(recipe), "runs": args.runs, "up_seconds": up_t, "bare_seconds": bare_t,
           "up_median": mu, "bare_median": mb, "ratio": ratio, "within_5_percent": ratio <= 1.05,
           "command": spec.command_line(), "loadavg_at_end": load, "cpus": os.cpu_count()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(f"{'':10s} {'median':>8s}   runs")
    print(f"{'up':10s} {mu:8.2f}   " + "  ".join(f"{t:.2f}" for t in up_t))
    print(f"{'bare':10s} {mb:8.2f}   " + "  ".join(f"{t:.2f}" for t in bare_t))
    print(f"ratio up/bare = {ratio:.3f} ({'within' if ratio <= 1.05 else 'NOT within'} 5%)  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
