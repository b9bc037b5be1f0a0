"""Greedy tokens + offline out tok/s of one in-process CPU vLLM engine, base + the 3 demo adapters (issue 15).

    flock /tmp/pd-vllm.lock .venv/bin/python scripts/check_lora_compile_cpu.py OUT.json   # PEFTDEPLOY_LORA_COMPILE=0: eager, to compare

Writes the tokens of a mixed 16-request batch (base, pirate, json, shout interleaved, max_loras 3) and of
2 prompts per adapter alone, and the median of 3 timed runs (32 chat prompts x 32 tokens, max_num_seqs 8)
for base-only, 1-adapter and Zipf-like 3-adapter traffic. Compare two OUT.json files for equal tokens.
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO)
from peftdeploy.vllm_compat import ensure_vllm_cpu_compat
ensure_vllm_cpu_compat()
from peftdeploy.demo import build_demo_model, demo_adapter_dir
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
prompts = [json.loads(x)["prompt"] for x in (Path(REPO) / "peftdeploy/data/prompts/mixed.jsonl").read_text().splitlines() if x.strip()][:32]
names = ["pirate", "json", "shout"]
t0 = time.perf_counter()
llm = LLM(model=str(build_demo_model(progress=False)), dtype="float32", max_model_len=2048, enable_lora=True,
          max_lora_rank=16, max_loras=3, max_cpu_loras=3, seed=0, max_num_seqs=8)
t_load = time.perf_counter() - t0
reqs = [None] + [LoRARequest(n, i + 1, str(demo_adapter_dir(n))) for i, n in enumerate(names)]
chats = [[{"role": "user", "content": p}] for p in prompts]
sp = SamplingParams(temperature=0.0, max_tokens=24)
mixed = [reqs[i % 4] for i in range(16)]
out = {"load_s": t_load}
r = llm.chat(chats[:16], sp, lora_request=mixed, use_tqdm=False)
out["mixed"] = [list(o.outputs[0].token_ids) for o in r]
seq = []
for lr in reqs:
    r = llm.chat(chats[:2], sp, lora_request=lr, use_tqdm=False)
    seq.append([list(o.outputs[0].token_ids) for o in r])
out["seq"] = seq
sp2 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
zipf = [reqs[1 + i] for i in (0, 0, 1, 0, 2, 0, 1, 0)]
for name, lr in (("base", [None] * 32), ("1 adapter", [reqs[1]] * 32), ("3 adapters", [zipf[i % 8] for i in range(32)])):
    ts = []
    for rep in range(3):
        t = time.perf_counter(); llm.chat(chats, sp2, lora_request=lr, use_tqdm=False); ts.append(time.perf_counter() - t)
    out[name] = sorted(32 * 32 / t for t in ts)[1]
print(json.dumps({k: v for k, v in out.items() if k not in ("mixed", "seq")}))
Path(sys.argv[1]).write_text(json.dumps(out))
