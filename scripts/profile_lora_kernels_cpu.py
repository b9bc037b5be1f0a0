#!/usr/bin/env python3
"""Where the time of a CPU LoRA step goes (issue 15): one in-process vLLM engine, the demo model and adapters.

    flock /tmp/pd-vllm.lock .venv/bin/python scripts/profile_lora_kernels_cpu.py [--kernels peftdeploy|vllm]

Runs the same requests (32 chat prompts from the shipped prompt set, 32 output tokens, max_num_seqs 8, greedy)
as base-only traffic, all to the hottest adapter, and Zipf-like over the three, in one engine with LoRA
enabled (max_loras 3), and times every call of the punica wrapper (update_metadata, add_lora_linear,
add_lora_embedding, add_lora_logits) with perf_counter. Prints per setup: wall time, engine steps, ms per
step, and ms per step spent inside the wrapper, so that "LoRA cost per step" = (setup - base) is split into
the wrapper's own time and the rest. Writes out/profile_lora_kernels_cpu.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="peftdeploy", choices=["peftdeploy", "vllm"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--setups", default="base,1 adapter,3 adapters", help="comma-separated subset")
    ap.add_argument("--torch-profile", action="store_true", help="also a torch.profiler table of the 1-adapter run")
    a = ap.parse_args()
    os.environ["PEFTDEPLOY_LORA_KERNELS"] = a.kernels
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: the timers see it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    ensure_vllm_cpu_compat()
    from peftdeploy.demo import build_demo_model, demo_adapter_dir
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from peftdeploy.vllm_plugin.lora_kernels import cpu as lkcpu

    times: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    cls = lkcpu.PunicaWrapperPeftdeployCPU if a.kernels == "peftdeploy" else PunicaWrapperCPU

    def timed(name):
        f = getattr(cls, name)

        def w(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                times[name] += time.perf_counter() - t
                calls[name] += 1
        return w

    for n in ("update_metadata", "add_lora_linear", "add_lora_embedding", "add_lora_logits"):
        setattr(cls, n, timed(n))

    prompts = [json.loads(x)["prompt"] for x in (REPO / "peftdeploy/data/prompts/mixed.jsonl").read_text().splitlines()
               if x.strip()][: a.requests]
    names = ["pirate", "json", "shout"]  # recipes/demo.yaml, hottest first
    llm = LLM(model=str(build_demo_model(progress=False)), dtype="float32", max_model_len=2048, enable_lora=True,
              max_lora_rank=16, max_loras=len(names), max_cpu_loras=len(names), seed=0, max_num_seqs=8)
    reqs = {n: LoRARequest(n, i + 1, str(demo_adapter_dir(n))) for i, n in enumerate(names)}
    sp = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    zipf = [names[i] for i in (0, 0, 1, 0, 2, 0, 1, 0)]  # ~Zipf(1.0) over 3: 5/8, 2/8, 1/8
    setups = {"base": [None] * len(chats), "1 adapter": [reqs[names[0]]] * len(chats),
              "3 adapters": [reqs[zipf[i % 8]] for i in range(len(chats))]}
    eng = llm.llm_engine
    steps = collections.Counter()
    orig_step = eng.step

    def step():
        steps["n"] += 1
        return orig_step()
    eng.step = step
    llm.chat(chats[:8], sp, lora_request=setups["3 adapters"][:8], use_tqdm=False)  # warm-up, loads adapters
    out = {}
    for name, lr in setups.items():
        if name not in a.setups.split(",") and name != "base":
            continue
        for rep in range(2):
            times.clear(); calls.clear(); steps.clear()
            t0 = time.perf_counter()
            res = llm.chat(chats, sp, lora_request=lr, use_tqdm=False)
            wall = time.perf_counter() - t0
        ntok = sum(len(o.outputs[0].token_ids) for o in res)
        out[name] = {"wall_s": wall, "out_tok_s": ntok / wall, "steps": steps["n"],
                     "ms_per_step": 1000 * wall / max(1, steps["n"]),
                     "wrapper_ms_per_step": {k: 1000 * v / max(1, steps["n"]) for k, v in times.items()},
                     "calls_per_step": {k: v / max(1, steps["n"]) for k, v in calls.items()}}
    base = out["base"]["ms_per_step"]
    print(f"\nkernels {a.kernels}: {a.requests} requests, {a.output_len} out tokens, max_num_seqs 8")
    for name, r in out.items():
        wr = sum(r["wrapper_ms_per_step"].values())
        print(f"{name:11s} {r['out_tok_s']:7.1f} out tok/s  {r['steps']:4d} steps  {r['ms_per_step']:6.2f} ms/step  "
              f"(+{r['ms_per_step'] - base:5.2f} vs base)  wrapper {wr:6.2f} ms/step: "
              + ", ".join(f"{k} {v:.2f} ({r['calls_per_step'][k]:.0f} calls)" for k, v in r["wrapper_ms_per_step"].items()))
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.chat(chats[:16], sp, lora_request=setups["1 adapter"][:16], use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    (REPO / "out").mkdir(exist_ok=True)
    (REPO / "out" / f"profile_lora_kernels_cpu_{a.kernels}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
