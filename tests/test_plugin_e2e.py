"""End to end on the CPU vLLM: the peftdeploy plugin resolves adapters on first request.

One server (demo backbone SmolLM2-135M, float32) started like a user's own ``vllm serve`` with the
package installed: ``PEFTDEPLOY_RECIPE`` + ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora``,
``--max-loras 2 --max-cpu-loras 3``, and **no** ``--lora-modules``. The recipe lists 6 servable
adapters (the two demo adapters + 4 random LoRAs on the demo backbone) and 3 incompatible ones.

1. Load test first, so the first requests for every adapter arrive concurrently: 300 completions
   (max_tokens 8, temperature 0) spread over the 6 adapters and the base, 16 in flight.
2. References afterwards: each (model, prompt) pair served alone (one request in flight at a time)
   on the same server. Every load-test response must equal its reference.
3. The engine's LoRA cache evictions are visible in the server log (the plugin logs vLLM's evictions
   at INFO), every adapter was resolved exactly once.
4. Unknown name -> 404 with a message; wrong base / rank above --max-lora-rank / DoRA -> 422 with the
   reason; a catalog directory adapter resolves; the server keeps serving afterwards.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EAGER_LORA
from tests.hubcache import TINY_LLAMA, module_dims, write_adapter

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEMO_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Once upon a time, a pirate", "def fibonacci(n):",
           "Three facts about the ocean:"]
SERVABLE = ["pirate", "json", "rand-1", "rand-2", "rand-3", "rand-4"]


def _free_port(lo: int = 18310, hi: int = 18389) -> int:
    for p in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue
    pytest.skip(f"no free port in {lo}-{hi}")


def random_lora(out: Path, cfg: dict, *, r: int, seed: int, targets=("q_proj", "v_proj", "o_proj"),
                b_scale: float = 0.08) -> Path:
    """A PEFT LoRA adapter on the demo backbone with random (non-zero) A and B, float32."""
    from safetensors.numpy import load_file, save_file

    write_adapter(out, cfg, r=r, targets=targets, dtype=np.float32, base_model=DEMO_BASE)
    rng = np.random.default_rng(seed)
    t = load_file(str(out / "adapter_model.safetensors"))
    for k, v in t.items():
        if ".lora_A." in k:
            t[k] = (rng.standard_normal(v.shape) / np.sqrt(v.shape[1])).astype(np.float32)
        else:
            t[k] = (rng.standard_normal(v.shape) * b_scale).astype(np.float32)
    save_file(t, str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from peftdeploy.demo import resolve_demo

    try:
        model_dir = Path(resolve_demo("demo://smollm2-135m", progress=False))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"demo model unavailable: {e}")
    tmp = tmp_path_factory.mktemp("plugin-e2e")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert module_dims(cfg)
    ads = tmp / "adapters"
    for i, r in enumerate((8, 16, 4, 16), start=1):
        random_lora(ads / f"rand-{i}", cfg, r=r, seed=100 + i)
    write_adapter(ads / "too-big", cfg, r=32, dtype=np.float32, base_model=DEMO_BASE)
    write_adapter(ads / "dora-ad", cfg, r=8, dtype=np.float32, base_model=DEMO_BASE, use_dora=True)
    write_adapter(ads / "wrong-base", {**TINY_LLAMA, "_name_or_path": "acme/tiny"}, r=8, dtype=np.float32,
                  base_model="acme/tiny")
    random_lora(tmp / "catalog" / "from-catalog", cfg, r=8, seed=7)
    adapters = [{"name": "pirate", "source": "demo://adapters/pirate"},
                {"name": "json", "source": "demo://adapters/json"}]
    adapters += [{"name": n, "source": f"./adapters/{n}"}
                 for n in ("rand-1", "rand-2", "rand-3", "rand-4", "too-big", "dora-ad", "wrong-base")]
    import yaml

    recipe = {"apiVersion": "peftdeploy/v1", "name": "plugin-e2e",
              "backbone": {"model": str(model_dir), "dtype": "float32", "max_model_len": 512},
              "adapters": adapters,
              "policy": {"mode": "serve", "dynamic_loading": True, "catalog": ["./catalog"]},
              "serving": {"max_loras": 2, "max_cpu_loras": 3, "max_lora_rank": 16, "max_num_seqs": 16}}
    rp = tmp / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    port = _free_port()
    env = dict(os.environ)
    env.update({"PEFTDEPLOY_RECIPE": str(rp), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "PEFTDEPLOY_CACHE": str(tmp / "pdcache"), "VLLM_CPU_KVCACHE_SPACE": "1",
                "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(EAGER_LORA)  # the resolver is the subject, not the LoRA model (conftest.EAGER_LORA)
    env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, "-m", "peftdeploy.launch.entry", "serve", str(model_dir),
           "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--max-num-seqs", "16", "--enable-lora", "--max-loras", "2",
           "--max-cpu-loras", "3", "--max-lora-rank", "16", "--seed", "0"]
    log = tmp / "server.log"
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"vLLM did not become ready:\n{log.read_text()[-6000:]}")
            time.sleep(2)
        yield {"url": url, "log": log, "proc": proc, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fh.close()


async def _complete(client, url: str, model: str, prompt: str) -> tuple[int, dict]:
    r = await client.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                          "temperature": 0.0, "seed": 0})
    return r.status_code, r.json()


def test_plugin_end_to_end(server):
    import httpx

    url, log = server["url"], server["log"]
    models = ["base", *SERVABLE]
    rng = random.Random(0)
    jobs = [(models[i % len(models)], PROMPTS[rng.randrange(len(PROMPTS))]) for i in range(300)]
    rng.shuffle(jobs)

    async def load_test():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(job):
                async with sem:
                    return job, *(await _complete(client, url, *job))
            return await asyncio.gather(*(one(j) for j in jobs))

    t0 = time.time()
    results = asyncio.run(load_test())
    load_s = time.time() - t0
    errors = [(job, code, body) for job, code, body in results if code != 200]
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}\n{log.read_text()[-4000:]}"

    # references: each (model, prompt) served alone, after the load test
    refs: dict[tuple[str, str], str] = {}
    with httpx.Client(timeout=300) as c:
        for m in models:
            for p in PROMPTS:
                r = c.post(url + "/v1/completions", json={"model": m, "prompt": p, "max_tokens": 8,
                                                          "temperature": 0.0, "seed": 0})
                assert r.status_code == 200, r.text
                refs[(m, p)] = r.json()["choices"][0]["text"]
    mismatches = [(job, body["choices"][0]["text"], refs[job]) for job, _c, body in results
                  if body["choices"][0]["text"] != refs[job]]
    ad_mismatches = [m for m in mismatches if m[0][0] != "base"]
    base_mismatches = [m for m in mismatches if m[0][0] == "base"]
    assert not ad_mismatches, f"{len(ad_mismatches)} adapter responses differ from their reference: {ad_mismatches[:5]}"
    # base requests batched with adapter requests must get no adapter (vLLM-CPU's LoRA gather of
    # index -1 picked the last slot's adapter; peftdeploy.vllm_plugin.cpu_fix corrects it)
    assert not base_mismatches, f"{len(base_mismatches)} base responses differ from their reference: {base_mismatches[:5]}"
    # the adapters really change the output (otherwise the comparison would prove little)
    for m in SERVABLE:
        assert any(refs[(m, p)] != refs[("base", p)] for p in PROMPTS), f"{m} behaves like the base model"

    text = log.read_text()
    resolved = re.findall(r"Resolved and loaded LoRA adapter '([^']+)' using PeftDeployLoRAResolver", text)
    assert sorted(resolved) == sorted(SERVABLE), resolved  # each resolved exactly once, under concurrency
    cpu_evictions = len(re.findall(r"peftdeploy: engine evicted LoRA int id", text))
    slot_evictions = len(re.findall(r"peftdeploy: engine swapped LoRA int id", text))
    assert cpu_evictions > 0 and slot_evictions > 0, (cpu_evictions, slot_evictions)
    print(f"\nload test: 300 requests, 0 errors, base mismatches {len(base_mismatches)}, {load_s:.1f} s; adapter responses all equal their served-alone references; "
          f"engine CPU-cache evictions {cpu_evictions}, slot evictions {slot_evictions}")
    (server["tmp"] / "e2e_result.json").write_text(json.dumps(
        {"requests": 300, "errors": 0, "adapter_mismatches": 0, "base_mismatches": len(base_mismatches), "seconds": round(load_s, 1),
         "cpu_evictions": cpu_evictions, "slot_evictions": slot_evictions}))

    with httpx.Client(timeout=300) as c:
        def ask(model: str) -> httpx.Response:
            return c.post(url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4,
                                                         "temperature": 0.0})

        r = ask("no-such-adapter")
        assert r.status_code == 404, r.text
        assert "`no-such-adapter` does not exist" in r.json()["error"]["message"]
        assert ask("../../etc/passwd").status_code == 404
        for name, words in (("too-big", ["rank 32", "max_lora_rank 16"]), ("dora-ad", ["DoRA"]),
                            ("wrong-base", ["does not fit the backbone"])):
            r = ask(name)
            assert r.status_code == 422, (name, r.status_code, r.text)
            msg = r.json()["error"]["message"]
            for w in words:
                assert w in msg, (name, msg)
        r = ask("from-catalog")
        assert r.status_code == 200, r.text
        # still serving: base and an adapter, and the engine is healthy
        assert ask("base").status_code == 200 and ask("pirate").status_code == 200
        assert c.get(url + "/health").status_code == 200
        names = {m["id"] for m in c.get(url + "/v1/models").json()["data"]}
        assert set(SERVABLE) | {"base", "from-catalog"} <= names
        assert not {"too-big", "dora-ad", "wrong-base"} & names
    assert server["proc"].poll() is None
    assert "Traceback" not in log.read_text()
    # Last, so that everything above is checked first: base-model requests batched together with LoRA
    # requests on vLLM-cpu 0.32 sometimes get an adapter's delta (seen equally in a second, warm pass in
    # which no adapter is resolved or loaded out of band: a vLLM CPU multi-LoRA batching problem).
    assert not base_mismatches, (f"{len(base_mismatches)} base-model responses differ from the base served "
                                 f"alone (adapters all match): {base_mismatches[:3]}")
