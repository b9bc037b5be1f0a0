#!/usr/bin/env python3
"""Cross-check `peftdeploy bench` against vLLM's own `vllm bench serve` on the same workload (issue 10).

    .venv/bin/pip install pandas   # vllm bench serve's custom dataset needs it (vllm[bench])
    .venv/bin/python scripts/bench_crosscheck_vllm.py [--recipe recipes/demo.yaml] [--model pirate]

Starts the recipe's deployment once (`peftdeploy up --detach`), then alternates, `--runs` times each:

  ours   peftdeploy bench --url ... --adapters MODEL --zipf 0 --prompts P --concurrency C -n N
  vllm   peftdeploy-vllm bench serve --dataset-name custom --dataset-path P' --skip-chat-template
         --max-concurrency C --num-prompts N --ignore-eos --custom-output-len L  (same prompts, same model)

Both send the same prompts (the first N of the shipped prompt set), streaming /v1/completions with
ignore_eos and the same max_tokens, at the same closed-loop concurrency. Prints medians and the
ratio ours/vLLM for output tok/s, TTFT p50, TPOT p50; writes out/bench_crosscheck_vllm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def ours(url: str, recipe: str, model: str, prompts: Path, conc: int, n: int, out: Path) -> dict:
    p = _run([str(BIN / "peftdeploy"), "bench", recipe, "--url", url, "--adapters", model, "--zipf", "0",
              "--base-share", "0", "--prompts", str(prompts), "--concurrency", str(conc), "-n", str(n),
              "--warmup", "4", "--runs", "1", "--out", str(out), "--json"])
    if p.returncode != 0:
        raise SystemExit(f"peftdeploy bench failed:\n{p.stderr[-3000:]}")
    med = json.loads(p.stdout)["points"][0]["summary"]
    return {"output_tok_s": med["output_tok_s"], "ttft_p50_ms": med["ttft_s"]["p50"] * 1e3,
            "tpot_p50_ms": med["tpot_s"]["p50"] * 1e3, "requests": med["requests"], "errors": med["errors"]}


def vllm_bench(url: str, model: str, tokenizer: str, prompts: Path, out_len: int, conc: int, n: int,
               out: Path) -> dict:
    result = out / "vllm_bench.json"
    p = _run([str(BIN / "peftdeploy-vllm"), "bench", "serve", "--backend", "openai", "--base-url", url,
              "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
              "--dataset-name", "custom", "--dataset-path", str(prompts), "--skip-chat-template",
              "--custom-output-len", str(out_len), "--num-prompts", str(n), "--max-concurrency", str(conc),
              "--ignore-eos", "--num-warmups", "4", "--save-result", "--result-dir", str(out),
              "--result-filename", result.name, "--disable-tqdm"],
             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0 or not result.exists():
        raise SystemExit(f"vllm bench serve failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    r = json.loads(result.read_text())
    return {"output_tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"],
            "tpot_p50_ms": r["median_tpot_ms"], "requests": r["completed"], "errors": n - r["completed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "demo.yaml"))
    ap.add_argument("--model", default="pirate", help="model name to load (an adapter, or the base)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("-n", "--num-requests", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port", type=int, default=18270)
    ap.add_argument("--out", default=str(REPO / "out"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="crosscheck-"))

    lines = (REPO / "peftdeploy" / "data" / "prompts" / "mixed.jsonl").read_text().splitlines()[: a.num_requests]
    prompts = [json.loads(x)["prompt"] for x in lines]
    ours_p, vllm_p = work / "ours.jsonl", work / "vllm.jsonl"
    ours_p.write_text("".join(json.dumps({"prompt": p, "output_len": a.output_len}) + "\n" for p in prompts))
    vllm_p.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    up = _run([str(BIN / "peftdeploy"), "up", a.recipe, "--detach", "--port", str(a.port), "--json"])
    if up.returncode != 0:
        raise SystemExit(f"up failed:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}")
    info = json.loads(up.stdout)
    url = f"http://127.0.0.1:{a.port}"
    sys.path.insert(0, str(REPO))
    from peftdeploy.plan import make_plan  # the directory vLLM serves holds the tokenizer
    from peftdeploy.recipe import load_recipe

    tokenizer = make_plan(load_recipe(a.recipe), device="cpu").launch.model
    try:
        rows: dict[str, list[dict]] = {"ours": [], "vllm": []}
        for i in range(a.runs):
            for name in ("ours", "vllm") if i % 2 == 0 else ("vllm", "ours"):
                d = work / f"{name}-{i}"
                d.mkdir()
                r = (ours(url, a.recipe, a.model, ours_p, a.concurrency, a.num_requests, d) if name == "ours"
                     else vllm_bench(url, a.model, tokenizer, vllm_p, a.output_len, a.concurrency, a.num_requests, d))
                rows[name].append(r)
                print(f"run {i + 1} {name:5s}: {r['output_tok_s']:.1f} out tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                      f"TPOT p50 {r['tpot_p50_ms']:.1f} ms, errors {r['errors']}", flush=True)
    finally:
        _run([str(BIN / "peftdeploy"), "down", info.get("name", Path(a.recipe).stem)])
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")}
           for k, v in rows.items()}
    ratio = {m: med["ours"][m] / med["vllm"][m] for m in med["ours"]}
    print(f"\n{a.model} on {a.recipe}: {a.num_requests} requests, concurrency {a.concurrency}, "
          f"{a.output_len} output tokens, median of {a.runs}")
    print("| metric | peftdeploy bench | vllm bench serve | ratio |\n|---|---|---|---|")
    for m in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms"):
        print(f"| {m} | {med['ours'][m]:.1f} | {med['vllm'][m]:.1f} | {ratio[m]:.3f} |")
    res = {"recipe": a.recipe, "model": a.model, "concurrency": a.concurrency, "num_requests": a.num_requests,
           "output_len": a.output_len, "runs": rows, "median": med, "ratio_ours_over_vllm": ratio}
    (out / "bench_crosscheck_vllm.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / 'bench_crosscheck_vllm.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
