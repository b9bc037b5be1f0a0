"""Slow: start CPU vLLM in-process on the demo model with LoRA enabled and compare its real LoRA buffers
and KV-cache capacity with the planner's prediction (exact bytes; KV tokens within 5%)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import json, os, re, sys
    from peftdeploy.vllm_compat import ensure_vllm_cpu_compat

    def main():
        ensure_vllm_cpu_compat()
        from vllm import LLM
        model, max_loras, rank, dtype, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        llm = LLM(model=model, enable_lora=True, max_loras=max_loras, max_lora_rank=rank, max_cpu_loras=max_loras,
                  dtype=dtype, max_model_len=max_len, max_num_seqs=8, enforce_eager=True, skip_tokenizer_init=True,
                  max_num_batched_tokens=max(512, max_len))

        def lora_bytes(m):
            out = {}
            for name, mod in m.named_modules():
                for attr in ("lora_a_stacked", "lora_b_stacked"):
                    t = getattr(mod, attr, None)
                    if t is None:
                        continue
                    ts = t if isinstance(t, (tuple, list)) else (t,)
                    n = sum(x.numel() * x.element_size() for x in ts)
                    out[name + "." + attr] = n
            return out

        per = llm.apply_model(lora_bytes)[0]
        cc = llm.llm_engine.vllm_config.cache_config
        print("RESULT " + json.dumps({"lora": per, "kv_tokens": getattr(cc, "kv_cache_size_tokens", None),
                                      "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size}), flush=True)

    if __name__ == "__main__":
        main()
''')


def _demo_model() -> Path:
    from peftdeploy.demo import resolve_demo

    return Path(resolve_demo("demo://smollm2-135m", progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("max_loras,rank,dtype", [(1, 8, "bfloat16"), (2, 16, "float32")])
def test_lora_slots_and_kv_match_vllm(tmp_path: Path, max_loras: int, rank: int, dtype: str) -> None:
    from peftdeploy.inventory import inspect_model
    from peftdeploy.plan.memory import kv_bytes_per_token, lora_slot_bytes
    from peftdeploy.recipe import load_recipe
    from peftdeploy.plan import make_plan
    from peftdeploy.sources import ResolvedSource

    model_dir = _demo_model()
    max_len = 1024
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        apiVersion: peftdeploy/v1
        name: slow
        backbone: {{model: "{model_dir}", dtype: {dtype}, max_model_len: {max_len}}}
        serving: {{max_loras: {max_loras}, max_lora_rank: {rank}, max_num_seqs: 8}}
        policy: {{mode: serve, dynamic_loading: true, catalog: ["{tmp_path}"]}}
        """))
    plan = make_plan(load_recipe(recipe), device="cpu")
    env_plan = dict(plan.launch.env)
    assert "VLLM_CPU_KVCACHE_SPACE" in env_plan
    info = inspect_model(ResolvedSource(str(model_dir), "local", model_dir))
    elt = 2 if dtype == "bfloat16" else 4
    predicted = lora_slot_bytes(info, max_loras=max_loras, max_lora_rank=rank, dtype_bytes=elt)
    assert plan.memory is not None and plan.memory.lora_slot_bytes == predicted

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": env_plan["VLLM_CPU_KVCACHE_SPACE"], "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(max_loras), str(rank), dtype, str(max_len)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    actual = sum(res["lora"].values())
    print(f"\nmax_loras={max_loras} rank={rank} {dtype}: predicted {predicted} B, vLLM {actual} B "
          f"({len(res['lora'])} buffers)")
    assert actual == predicted, json.dumps(res["lora"], indent=0)[:3000]

    import re
    m = re.search(r"KV cache size: ([0-9,]+) tokens", log)
    vllm_tokens = int(m.group(1).replace(",", "")) if m else res["kv_tokens"]
    assert vllm_tokens, log[-3000:]
    predicted_tokens = plan.memory.kv_tokens
    err = abs(predicted_tokens - vllm_tokens) / vllm_tokens
    print(f"KV tokens: predicted {predicted_tokens}, vLLM {vllm_tokens}, error {err:.3%} "
          f"(VLLM_CPU_KVCACHE_SPACE={env_plan['VLLM_CPU_KVCACHE_SPACE']} GiB, "
          f"{kv_bytes_per_token(info, kv_dtype_bytes=elt)} B/token)")
    assert err <= 0.05



@pytest.mark.slow
def test_engine_args_list_matches_installed_vllm() -> None:
    """peftdeploy/data/vllm_engine_args.json is what the installed vLLM's `vllm serve` parser accepts."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_vllm_args.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, "stale: run python scripts/gen_vllm_args.py\n" + r.stderr[-2000:]
