"""Sweep the int8 (W8A8) SmoothQuant + GPTQ settings on a merged model; perplexity of each with vLLM.

    flock /tmp/pd-vllm.lock .venv/bin/python scripts/sweep_int8.py MERGED_DIR trials.json [--out DIR]

trials.json: a list of {"name": ..., "options": {...}} (keys of llmc_worker.INT8_GPTQ; missing = the
default). Each trial runs the llm-compressor worker (quantize tool venv) on the shipped calibration
set (64 x 512, as the demo recipe), then all checkpoints are scored in one vLLM child on the shipped
eval text, exactly as `peftdeploy eval` scores them (bfloat16, window 512 / stride 256). Prints one
JSON line per trial: name, options, ppl, seconds. Used to pick llmc_worker.INT8_GPTQ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged")
    ap.add_argument("trials")
    ap.add_argument("--out", default="/tmp/int8-sweep")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--with-base", action="store_true", help="also score the full-precision model")
    a = ap.parse_args()
    from peftdeploy.quantize.calibration import load_calibration
    from peftdeploy.quantize.methods import require_tool
    from peftdeploy.quantize.ppl import measure

    py = require_tool("sweep")
    cal = load_calibration()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tf = out / "calibration.txt"
    tf.write_text(cal.text, encoding="utf-8")
    trials = json.loads(Path(a.trials).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    dirs, secs = [], []
    for t in trials:
        d = out / t["name"]
        if not (d / "config.json").is_file():
            job = {"src": a.merged, "out": str(d), "scheme": "int8", "method": "gptq", "group_size": None,
                   "threads": os.cpu_count() or 2, "options": t.get("options") or {},
                   "calibration": {"text_file": str(tf), "samples": t.get("samples", a.samples),
                                   "seq_len": t.get("seq_len", a.seq_len)}}
            jf = out / f"{t['name']}.job.json"
            jf.write_text(json.dumps(job))
            t0 = time.perf_counter()
            with open(out / f"{t['name']}.log", "w") as lf:
                rc = subprocess.run([str(py), str(ROOT / "peftdeploy/quantize/llmc_worker.py"), str(jf)],
                                    stdout=lf, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                print(json.dumps({"name": t["name"], "error": f"worker exit {rc}, see {out}/{t['name']}.log"}))
                continue
            secs.append(round(time.perf_counter() - t0, 1))
        else:
            secs.append(None)
        dirs.append((t, d))
    models = ([a.merged] if a.with_base else []) + [str(d) for _, d in dirs]
    res = measure(models, log_path=out / "ppl.log")
    if a.with_base:
        print(json.dumps({"name": "full-precision", "ppl": res[0].ppl}))
        res = res[1:]
    for (t, _), r, s in zip(dirs, res, secs):
        print(json.dumps({"name": t["name"], "options": t.get("options"), "ppl": round(r.ppl, 4),
                          "quantize_s": s, "ppl_s": r.seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
