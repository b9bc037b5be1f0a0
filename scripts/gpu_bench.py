#!/usr/bin/env python3
"""GPU run of issues 10 and 11 (8B shape, one GPU): merged vs plain multi-LoRA vs tuned multi-LoRA vs the
hybrid policy (hot adapter merged, the others as exact delta LoRAs), the planner's KV-cache prediction
against what vLLM reports, bf16 greedy agreement hybrid vs plain, and a kernel profile of multi-LoRA.
Results of the 2026-11-30 H200 run: docs/bench/gpu-h200.{md,json,png}.

Self-contained for an offline GPU machine (scripts/gpu_bench.sh prepares vLLM 0.26 and calls this; it
says how the run was split into device calls): needs torch, safetensors, tokenizers, transformers, vLLM,
aiohttp or httpx, and this repository on PYTHONPATH. Run from the repository root.

1. Assets: /tmp/m, a Llama-3-8B-shaped config.json + a locally built byte-level tokenizer (no weights:
   vLLM's ``--load-format dummy``); /tmp/loras/lora{i}: 8 random rank-16 PEFT adapters on all linear
   layers; /tmp/delta: delta adapters against backbone+l0 (peftdeploy.merge.delta.build_delta_adapters:
   ``base`` rank 16, l1..l7 rank 32). ``--prep`` builds only these (and the agreement model) and exits.
2. Servers (``--servers``, run one after another, each with CUDA graphs; the flags are the planner's
   LaunchSpec for the equivalent recipe, edited only where the setup says):
   merged (no LoRA = merged-model speed; dummy weights, so "merged" is the same dummy model),
   plain (planner default: max_loras 8, max_lora_rank 16), plain_base (base traffic on the LoRA server),
   tuned (VLLM_LORA_ENABLE_DUAL_STREAM=1 + --specialize-active-lora), ds, sp, ml4 (max_loras 4),
   mnbt2k (--max-num-batched-tokens 2048), hybrid (served name l0 = merged backbone, no LoRA for l0;
   base + l1..l7 as deltas, --max-lora-rank 32), hybrid_tuned, profile (plain + torch profiler: base
   traffic, then /start_profile over a Zipf burst; vLLM's self-CUDA-time table -> kernel classes),
   agreement (4-layer model with real random weights, eager, bf16: plain W + l0..l7 vs hybrid W+l0 merged
   by peftdeploy's merge engine with deltas; greedy tokens per model name; plus the batch-order noise
   floor of the plain server).
3. Load: peftdeploy's own generator (peftdeploy.bench), closed loop, 64 concurrent, 200-word prompts,
   128 output tokens (ignore_eos), Zipf(1.0) over l0..l7 (l0 hottest); a warm-up of 64 requests, then
   2 measured runs of 320 requests with different prompts (no prefix-cache replay); median.
4. KV cache: "GPU KV cache size: N tokens" from each server's log vs the planner (make_plan).
Writes $OUT/gpu_bench.json after every setup (a cut-off run keeps what it measured), $OUT/gpu_bench.md,
$OUT/logs.tar.gz (server logs) and $OUT/profile_table.txt. A server is skipped when it would end after
``--deadline-s``; ``--skip-done`` skips servers an earlier call on the same machine measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peftdeploy.bench import report  # noqa: E402
from peftdeploy.bench.client import run_workload_sync  # noqa: E402
from peftdeploy.bench.deploy import Server, variant  # noqa: E402
from peftdeploy.bench.workload import WorkloadConfig, build_workload, model_shares, synthetic_prompt  # noqa: E402
from peftdeploy.plan.spec import LaunchSpec, ServedAdapter  # noqa: E402

GiB = 1 << 30
V = 128256
CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=V, bos_token_id=128000,
           eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16", attention_bias=False,
           mlp_bias=False)
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
          "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ assets
def make_model(model_dir: Path, cfg: dict | None = None) -> None:
    """config.json + generation_config.json + a byte-level BPE tokenizer of exactly V tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg or CFG, indent=1))
    if (model_dir / "tokenizer.json").exists():
        return
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    while len(vocab) < 128000:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_{i}|>" for i in range(V - 128002)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == V, tok.get_vocab_size()
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    ft.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    ft.save_pretrained(str(model_dir))


def make_adapters(lora_dir: Path, n: int, rank: int, model_dir: Path, unique: int | None = None) -> list[Path]:
    """n random PEFT LoRA adapters, all linear layers, B != 0 so they change the outputs. Adapters from
    index `unique` on are directories of links to adapter ``i % unique`` (distinct adapters to vLLM, same
    bytes: the many-adapter runs measure slots and caches, not weights)."""
    import torch
    from safetensors.torch import save_file

    out = []
    g = torch.Generator().manual_seed(0)
    unique = unique or n
    for i in range(n):
        d = lora_dir / f"lora{i}"
        out.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        if i >= unique:
            d.mkdir(parents=True, exist_ok=True)
            for f in ("adapter_model.safetensors", "adapter_config.json"):
                (d / f).symlink_to(lora_dir / f"lora{i % unique}" / f)
            continue
        d.mkdir(parents=True, exist_ok=True)
        t = {}
        for L in range(CFG["num_hidden_layers"]):
            for name, (fi, fo) in SHAPES.items():
                part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                p = f"base_model.model.model.layers.{L}.{part}.{name}"
                t[f"{p}.lora_A.weight"] = (torch.randn(rank, fi, generator=g) * 0.01).to(torch.bfloat16)
                t[f"{p}.lora_B.weight"] = (torch.randn(fo, rank, generator=g) * 0.01).to(torch.bfloat16)
        save_file(t, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
            target_modules=list(SHAPES), base_model_name_or_path=str(model_dir), fan_in_fan_out=False,
            inference_mode=True)))
    return out


# ------------------------------------------------------------------------------- prediction
def gpu_total_bytes() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(float(out.strip().splitlines()[0])) << 20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def predict_kv(model_dir: Path, *, gpu_bytes: int | None, util: float, max_loras: int | None, rank: int,
               max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> dict:
    """The planner's KV-cache prediction for these engine arguments (peftdeploy.plan.memory)."""
    try:
        from peftdeploy.inventory import model_info_from_config
        from peftdeploy.plan import memory as mem
    except Exception as e:  # noqa: BLE001
        return {"error": f"peftdeploy.plan.memory not importable here: {type(e).__name__}: {e}"}
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        info = model_info_from_config(cfg, path=str(model_dir), source=str(model_dir))
        total = gpu_bytes or mem.detect_gpu_memory()
        if total is None:
            return {"error": "GPU memory size unknown (nvidia-smi)"}
        dtype = "bfloat16"
        wb, note = mem.weight_bytes(info, scheme="none", dtype=dtype)
        lb = mem.lora_slot_bytes(info, max_loras=max_loras, max_lora_rank=rank, dtype_bytes=2) if max_loras else 0
        ob = mem.gpu_overhead_bytes(info, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                    dtype_bytes=2)
        per_tok = mem.kv_bytes_per_token(info, kv_dtype_bytes=2)
        kv = int(total * util) - wb - lb - ob
        out = {"gpu_total_bytes": total, "gpu_memory_utilization": util, "weight_bytes": wb, "weight_note": note,
               "lora_slot_bytes": lb, "overhead_bytes_estimate": ob, "kv_cache_bytes": kv,
               "kv_bytes_per_token": per_tok, "kv_tokens": kv // per_tok, "source": "peftdeploy.plan.memory pieces"}
        # If the planner exposes a one-call budget, prefer it (same inputs).
        fn = getattr(mem, "memory_budget", None) or getattr(mem, "estimate_memory", None)
        if fn is not None:
            try:
                b = fn(info, device="cuda", device_memory=total, gpu_memory_utilization=util, dtype=dtype,
                       max_loras=max_loras or 0, max_lora_rank=rank, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                       enable_lora=bool(max_loras))
                out.update({"kv_tokens": int(b.kv_tokens), "kv_cache_bytes": int(b.kv_cache_bytes),
                            "source": f"peftdeploy.plan.memory.{fn.__name__}"})
            except TypeError as e:
                out["budget_call_error"] = str(e)
        return out
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def write_recipe(path: Path, a: argparse.Namespace, model_dir: Path, lora_dir: Path, n_adapters: int,
                 max_loras: int | None, auto: bool = False) -> Path:
    """A peftdeploy recipe describing this benchmark setup (what a user would write)."""
    lines = ["apiVersion: peftdeploy/v1", "name: gpu-bench-8b", "backbone:", f"  model: {model_dir}",
             "  dtype: bfloat16", f"  max_model_len: {a.max_model_len}"]
    if n_adapters:
        lines.append("adapters:")
        for i in range(n_adapters):
            lines += [f"  - name: l{i}", f"    source: {lora_dir / f'lora{i}'}"]
    lines += ["policy:", "  mode: serve", "  dynamic_loading: false"]
    if auto and n_adapters:  # the traffic the planner is told: Zipf(a.zipf) shares over the adapters
        z = [1.0 / (i + 1) ** a.zipf for i in range(n_adapters)]
        lines += ["  traffic:"] + [f"    l{i}: {v / sum(z):.6f}" for i, v in enumerate(z)]
    lines += ["serving:", "  host: 127.0.0.1",
              f"  port: {a.port}", f"  gpu_memory_utilization: {a.gpu_memory_utilization}",
              f"  max_num_seqs: {a.max_num_seqs}"]
    if n_adapters and auto:
        lines += ["  max_loras: auto", f"  max_lora_rank: {a.rank}", "  max_cpu_loras: auto"]
    elif n_adapters:
        lines += [f"  max_loras: {max_loras}", f"  max_lora_rank: {a.rank}", f"  max_cpu_loras: {max(max_loras or 1, n_adapters)}"]
    lines += ["  extra_args:", "    load_format: dummy", f"    max_num_batched_tokens: {a.max_num_batched_tokens}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_for(recipe: Path, *, gpu_bytes: int | None, dry_run: bool) -> dict:
    """make_plan on the recipe: the LaunchSpec and the predicted KV cache (device cuda)."""
    try:
        from peftdeploy.plan import make_plan
        from peftdeploy.recipe import load_recipe

        plan = make_plan(load_recipe(recipe), device="cuda", gpu_memory=gpu_bytes or (143771 << 20))
        m = plan.memory
        kv = {"kv_tokens": m.kv_tokens, "kv_cache_bytes": m.kv_cache_bytes, "weight_bytes": m.weight_bytes,
              "lora_slot_bytes": m.lora_slot_bytes, "overhead_bytes_estimate": m.overhead_bytes,
              "kv_bytes_per_token": m.kv_bytes_per_token, "gpu_total_bytes": m.device_memory,
              "notes": list(m.notes), "source": "peftdeploy.plan.make_plan"} if m else {}
        errors = [f.message for f in plan.errors]
        return {"spec": plan.launch, "kv": kv, "plan_errors": errors}
    except Exception as e:  # noqa: BLE001 - fall back to flags built here
        return {"error": f"{type(e).__name__}: {e}"}


_KV_TOKENS = re.compile(r"GPU KV cache size:\s*([\d,]+)\s*tokens")
_KV_MEM = re.compile(r"Available KV cache memory:\s*([\d.]+)\s*GiB")
_CONC = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request:\s*([\d.]+)x")


def parse_kv(log_text: str) -> dict:
    out: dict = {}
    m = _KV_TOKENS.findall(log_text)
    if m:
        out["kv_tokens"] = int(m[-1].replace(",", ""))
    m = _KV_MEM.findall(log_text)
    if m:
        out["kv_cache_gib"] = float(m[-1])
    m = _CONC.findall(log_text)
    if m:
        out["max_concurrency"] = float(m[-1][1])
    return out


# ------------------------------------------------------------------------------------ hybrid
def build_deltas(lora_dir: Path, names: list[str], out_root: Path) -> dict[str, Path]:
    """Delta adapters against backbone+l0 (peftdeploy.merge.delta): base (rank r) + l1..l7 (rank 2r)."""
    import torch

    from peftdeploy.merge.delta import build_delta_adapters

    if (out_root / names[-1] / "adapter_model.safetensors").exists() and (out_root / "base").exists():
        return {n: out_root / n for n in ["base", *names[1:]]}
    return build_delta_adapters(hot=(names[0], lora_dir / "lora0", 1.0),
                                others=[(n, lora_dir / f"lora{i}", 1.0) for i, n in enumerate(names) if i],
                                out_root=out_root, base_name="base", dtype=torch.bfloat16)


def with_env(spec: LaunchSpec, **env: str) -> LaunchSpec:
    e = dict(spec.env)
    e.update(env)
    return dataclasses.replace(spec, env=tuple(e.items()))


def hybrid_spec(base_spec: LaunchSpec, deltas: dict[str, Path], hot: str, rank: int, max_loras: int) -> LaunchSpec:
    """The hybrid deployment: backbone with `hot` merged (dummy weights: the same dummy model) served
    under the name `hot`; every other adapter and the bare backbone ("base") as delta LoRAs."""
    ads = tuple(ServedAdapter(name=n, path=str(p), source=f"delta://{n}", rank=rank) for n, p in deltas.items())
    s = dataclasses.replace(base_spec, adapters=ads)
    return variant(s, adapters=[x.name for x in ads], max_loras=max_loras, max_lora_rank=rank,
                   served_model_name=hot, mode="hybrid")


# --------------------------------------------------------------------------------- agreement
SMALL = dict(CFG, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128)


def small_shapes() -> dict[str, tuple[int, int]]:
    h, i, kv = SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["num_key_value_heads"] * SMALL["head_dim"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def make_small_assets(root: Path, n: int, rank: int) -> dict[str, Path]:
    """A 4-layer Llama-3-vocab model with real random weights (std 0.02), n random rank-`rank` adapters
    that visibly change the outputs, the model with l0 merged (peftdeploy's merge engine, bf16) and the
    delta adapters (peftdeploy.merge.delta, bf16)."""
    import torch
    from safetensors.torch import save_file

    from peftdeploy.merge.common import AdapterInput
    from peftdeploy.merge.engine import merge_model

    m, lo, mh, dl = root / "model", root / "loras", root / "merged_l0", root / "delta"
    if (root / "done").exists():
        return {"model": m, "loras": lo, "merged": mh, "delta": dl}
    make_model(m, SMALL)
    g = torch.Generator().manual_seed(1)
    h, L = SMALL["hidden_size"], SMALL["num_hidden_layers"]
    t = {"model.embed_tokens.weight": torch.randn(V, h, generator=g) * 0.02,
         "lm_head.weight": torch.randn(V, h, generator=g) * 0.02, "model.norm.weight": torch.ones(h)}
    for l in range(L):
        for name, (fi, fo) in small_shapes().items():
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            t[f"model.layers.{l}.{part}.{name}.weight"] = torch.randn(fo, fi, generator=g) * 0.02
        t[f"model.layers.{l}.input_layernorm.weight"] = torch.ones(h)
        t[f"model.layers.{l}.post_attention_layernorm.weight"] = torch.ones(h)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}, str(m / "model.safetensors"))
    for i in range(n):
        d = lo / f"lora{i}"
        d.mkdir(parents=True, exist_ok=True)
        a = {}
        for l in range(L):
            for name, (fi, fo) in small_shapes().items():
                part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                p = f"base_model.model.model.layers.{l}.{part}.{name}"
                a[f"{p}.lora_A.weight"] = (torch.randn(rank, fi, generator=g) / fi ** 0.5).to(torch.bfloat16)
                a[f"{p}.lora_B.weight"] = (torch.randn(fo, rank, generator=g) * 0.01).to(torch.bfloat16)
        save_file(a, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
            target_modules=list(SHAPES), base_model_name_or_path=str(m), fan_in_fan_out=False, inference_mode=True)))
    if mh.exists():
        import shutil

        shutil.rmtree(mh)
    merge_model(m, [AdapterInput(name="l0", path=lo / "lora0", weight=1.0)], mh, dtype="bfloat16", progress=False)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (m / f).exists() and not (mh / f).exists():
            (mh / f).write_bytes((m / f).read_bytes())
    build_deltas(lo, [f"l{i}" for i in range(n)], dl)
    (root / "done").write_text("ok")
    return {"model": m, "loras": lo, "merged": mh, "delta": dl}


def greedy(url: str, model: str, prompts: list[str], max_tokens: int, conc: int) -> list[list[str] | None]:
    """Greedy completions (token strings from logprobs) for each prompt, `conc` in flight."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str) -> list[str] | None:
        body = json.dumps({"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                           "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["choices"][0]["logprobs"]["tokens"]
        except Exception as e:  # noqa: BLE001
            log(f"    greedy {model}: {type(e).__name__}: {e}")
            return None

    with ThreadPoolExecutor(conc) as ex:
        return list(ex.map(one, prompts))


def agreement(a: list, b: list) -> dict:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {"n": 0}
    same = sum(x == y for x, y in pairs)
    pos = sum(sum(p == q for p, q in zip(x, y)) for x, y in pairs)
    tot = sum(min(len(x), len(y)) for x, y in pairs)
    pref = []
    for x, y in pairs:
        k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        pref.append(k / max(1, min(len(x), len(y))))
    return {"n": len(pairs), "sequences_identical": same / len(pairs), "token_agreement": pos / max(1, tot),
            "prefix_agreement": statistics.mean(pref)}


# ------------------------------------------------------------------------------------- main
_current: list = [None]  # the running server, stopped on SIGTERM / exit (it runs in its own session)


def _stop_current(*_: object) -> None:
    srv = _current[0]
    if srv is not None:
        try:
            srv.stop(timeout_s=15)
        except Exception:  # noqa: BLE001
            pass
    if _:
        sys.exit(143)


FUSED_ENV = {"PEFTDEPLOY_LORA_ACT_FUSE": "1", "PEFTDEPLOY_LORA_NORM_FUSE": "1"}
EST_S = {"graphs": 140, "agreement": 110, "profile": 170}  # start + measurements, for the deadline check
DONE = Path("/tmp/gpu_bench_done.txt")  # servers measured by an earlier call on this (still warm) machine  # start + measurements, for the deadline check
SERVERS = ("merged", "plain", "hybrid", "tuned", "hybrid_tuned", "ds", "sp", "ml4", "mnbt2k", "agreement",
           "profile", "plain_base", "plain_vllm", "plain_pd", "plain_pd_base", "many_ml8_vllm", "many_ml8_pd",
           "many_auto_pd", "many_auto_vllm", "profile_pd", "profile_vllm", "profile_merged", "kagree", "pd_mix",
           "pd_ds", "plain_pd_pdl", "plain_pd_act", "plain_pd_fused", "kagree_fused",
           "many_auto_pd_fused", "many_ml16_pd", "many_ml24_pd", "many_ml32_pd")


def main() -> int:
    import atexit
    import signal

    atexit.register(_stop_current)
    signal.signal(signal.SIGTERM, _stop_current)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu")
    ap.add_argument("--servers", default="merged,plain,hybrid,tuned",
                    help=f"comma list, run in this order; any of {','.join(SERVERS)}")
    ap.add_argument("--model-dir", default="/tmp/m")
    ap.add_argument("--lora-dir", default="/tmp/loras")
    ap.add_argument("--delta-dir", default="/tmp/delta")
    ap.add_argument("--n-loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--many", type=int, default=64, help="adapters of the many-adapter servers (many_*)")
    ap.add_argument("--n-unique", type=int, default=8, help="distinct adapter weights among --many (the rest link)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--python", default=sys.executable, help="Python that runs vLLM")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=320)
    ap.add_argument("--input-len", type=int, default=200, help="prompt words")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup-requests", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--deadline-s", type=float, default=560.0,
                    help="start nothing that would end after this many seconds (one device call is <= 600 s)")
    ap.add_argument("--tag", default="", help="label stored in the JSON (e.g. call2)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and server commands, run nothing")
    ap.add_argument("--prep", action="store_true",
                    help="only build the assets (model, adapters, deltas, agreement model) and exit")
    ap.add_argument("--skip-done", action="store_true", help=f"skip servers listed in {DONE}")
    ap.add_argument("--no-planner", action="store_true", help="build the server flags here instead of make_plan")
    a = ap.parse_args()
    t_begin = time.time()
    out = Path(a.out)
    wanted = [x for x in a.servers.split(",") if x]
    bad = [x for x in wanted if x not in SERVERS]
    if bad:
        ap.error(f"unknown servers: {bad}")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    out_recipes = tmp / ("gpu_bench_recipes_dry" if a.dry_run else "gpu_bench_recipes")
    model_dir, lora_dir, delta_dir = Path(a.model_dir), Path(a.lora_dir), Path(a.delta_dir)
    names = [f"l{i}" for i in range(a.n_loras)]
    adapters = tuple(ServedAdapter(name=n, path=str(lora_dir / f"lora{i}"), source=f"random://{i}", rank=a.rank)
                     for i, n in enumerate(names))
    ml = min(8, a.n_loras)
    result: dict = {"config": dict(vars(a)), "model": CFG, "setups": [], "servers": {}, "tag": a.tag,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save() -> None:
        if not a.dry_run:
            report.write_json(result, out / "gpu_bench.json")

    if not a.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        try:
            result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            result["gpu"] = None
        result["vllm"] = subprocess.run([a.python, "-c", "import vllm; print(vllm.__version__)"],
                                        capture_output=True, text=True).stdout.strip() or "?"
        log(f"GPU: {result['gpu']}; vLLM {result['vllm']}; servers {wanted}")
    if not a.dry_run:
        t0 = time.time()
        make_model(model_dir)
        make_adapters(lora_dir, max(a.n_loras, a.many), a.rank, model_dir, unique=max(a.n_loras, a.n_unique))
        log(f"model + {max(a.n_loras, a.many)} adapters ({max(a.n_loras, a.n_unique)} distinct) ready in "
            f"{time.time() - t0:.0f} s")
    gpu_bytes = None if a.dry_run else gpu_total_bytes()
    if a.prep:
        t1 = time.time()
        if any(x.startswith("hybrid") for x in wanted):
            build_deltas(lora_dir, names, delta_dir)
            log(f"delta adapters ready in {time.time() - t1:.0f} s")
        t1 = time.time()
        make_small_assets(Path("/tmp/agree"), a.n_loras, a.rank)
        log(f"agreement assets ready in {time.time() - t1:.0f} s")
        return 0

    plans: dict[str, dict] = {}
    base_spec = None
    if not a.no_planner:
        # The planner's own LaunchSpec and memory prediction, from a recipe describing this setup.
        for tag, n_ad, mlx, auto in (("merged", 0, None, False), ("plain", a.n_loras, ml, False),
                                     ("many_ml8", a.many, 8, False), ("many_auto", a.many, None, True)):
            if tag.startswith("many") and not any(w.startswith("many") for w in wanted):
                continue
            rp = write_recipe(out_recipes / f"{tag}.yaml", a, model_dir, lora_dir, n_ad, mlx, auto=auto)
            plans[tag] = plan_for(rp, gpu_bytes=gpu_bytes, dry_run=a.dry_run)
            if tag == "many_auto" and "spec" in plans[tag]:
                result["many_auto_plan_args"] = [list(x) for x in plans[tag]["spec"].args if "lora" in x[0]]
        if "spec" in plans["plain"]:
            base_spec = plans["plain"]["spec"]
        result["planner_errors"] = {k: v.get("error") or v.get("plan_errors") for k, v in plans.items()}
    if base_spec is None:
        common: list[tuple[str, str | None]] = [
            ("--served-model-name", "base"), ("--load-format", "dummy"), ("--dtype", "bfloat16"),
            ("--max-model-len", str(a.max_model_len)), ("--gpu-memory-utilization", str(a.gpu_memory_utilization)),
            ("--max-num-seqs", str(a.max_num_seqs)), ("--max-num-batched-tokens", str(a.max_num_batched_tokens)),
            ("--host", "127.0.0.1"), ("--port", str(a.port)),
        ]
        base_spec = LaunchSpec(recipe_name="gpu-bench-8b", recipe_hash="-", mode="serve", model=str(model_dir),
                               model_source="llama3-8b-shaped (dummy weights)", served_model_name="base",
                               host="127.0.0.1", port=a.port, device="cuda", args=tuple(common), adapters=adapters)
        base_spec = variant(base_spec, adapters=names, max_loras=ml, max_lora_rank=a.rank)
    names = [x.name for x in base_spec.adapters] or names
    plain = base_spec  # exactly what the planner emits for this recipe (policy serve)
    zipf = tuple(names)
    shares = model_shares(WorkloadConfig(adapters=zipf, zipf_alpha=a.zipf, concurrency=1))
    result["zipf_shares"] = shares
    result["hot_share"] = shares.get(names[0])
    DS, SP = {"VLLM_LORA_ENABLE_DUAL_STREAM": "1"}, ("--specialize-active-lora", None)
    hyb_rank = 2 * a.rank
    deltas_paths = {n: delta_dir / n for n in ["base", *names[1:]]}

    def hyb() -> LaunchSpec:
        return hybrid_spec(plain, deltas_paths, names[0], hyb_rank, ml)

    PROF = ("--profiler-config", json.dumps(
        {"profiler": "torch", "torch_profiler_dir": "/tmp/vllm_prof", "torch_profiler_with_stack": False,
         "torch_profiler_use_gzip": True, "delay_iterations": 20, "max_iterations": 30}))
    # tag -> (description, spec factory, max_loras, setups [(label, adapters hottest first)], kind)
    zl = f"{a.n_loras} adapters Zipf({a.zipf:g})"
    catalog = {
        "merged": ("merged single model (no LoRA)", lambda: variant(plain, adapters=None, mode="merge"), None,
                   [("merged (no LoRA)", ())], "graphs"),
        "plain": (f"plain multi-LoRA, planner default (max_loras {ml}, max_lora_rank {a.rank})", lambda: plain, ml,
                  [(f"plain multi-LoRA, {zl}", zipf)], "graphs"),
        "plain_base": ("plain multi-LoRA server, base traffic only", lambda: plain, ml,
                       [("LoRA on, base traffic only", ())], "graphs"),
        "tuned": ("plain + VLLM_LORA_ENABLE_DUAL_STREAM=1 + --specialize-active-lora",
                  lambda: variant(with_env(plain, **DS), adapters=names, extra_args=[SP]), ml,
                  [(f"tuned multi-LoRA (dual stream + specialize), {zl}", zipf)], "graphs"),
        "ds": ("plain + VLLM_LORA_ENABLE_DUAL_STREAM=1", lambda: with_env(plain, **DS), ml,
               [(f"multi-LoRA + dual stream, {zl}", zipf)], "graphs"),
        "sp": ("plain + --specialize-active-lora", lambda: variant(plain, adapters=names, extra_args=[SP]), ml,
               [(f"multi-LoRA + specialize-active-lora, {zl}", zipf)], "graphs"),
        "ml4": ("plain with max_loras 4", lambda: variant(plain, adapters=names, max_loras=4), 4,
                [(f"multi-LoRA max_loras 4, {zl}", zipf)], "graphs"),
        "mnbt2k": ("plain with --max-num-batched-tokens 2048",
                   lambda: variant(plain, adapters=names, extra_args=[("--max-num-batched-tokens", "2048")]), ml,
                   [(f"multi-LoRA max_num_batched_tokens 2048, {zl}", zipf)], "graphs"),
        "hybrid": (f"hybrid: {names[0]} merged (served as {names[0]}, no LoRA), others + base as rank-{hyb_rank} "
                   f"deltas, max_lora_rank {hyb_rank}", hyb, ml, [(f"hybrid ({names[0]} merged), {zl}", zipf)], "graphs"),
        "hybrid_tuned": ("hybrid + VLLM_LORA_ENABLE_DUAL_STREAM=1 + --specialize-active-lora",
                         lambda: variant(with_env(hyb(), **DS), adapters=[x for x in ["base", *names[1:]]],
                                         extra_args=[SP]), ml,
                         [(f"hybrid + dual stream + specialize, {zl}", zipf)], "graphs"),
        "profile": ("plain multi-LoRA with the torch profiler (30 decode-heavy iterations)",
                    lambda: variant(plain, adapters=names, extra_args=[PROF]), ml,
                    [("LoRA on (plain server), base traffic only", ())], "profile"),
        "agreement": ("bf16 greedy agreement, 4-layer real-random-weights model, eager: plain vs hybrid", None, ml,
                      [], "agreement"),
    }
    PDK, VK = {"PEFTDEPLOY_LORA_KERNELS": "peftdeploy"}, {"PEFTDEPLOY_LORA_KERNELS": "vllm"}
    many_names = tuple(f"l{i}" for i in range(a.many))
    zm = f"{a.many} adapters Zipf({a.zipf:g})"

    def with_flag(plan: str, flag: str, value: int, env: dict) -> LaunchSpec:
        # the planner's spec for `plan` with one flag's value replaced, in `env`
        sp = with_env(plans[plan]["spec"], **env)
        return dataclasses.replace(sp, args=tuple((k, str(value) if k == flag else v) for k, v in sp.args))

    def many_ml8(env: dict) -> LaunchSpec:
        # the setting: all adapters listed, max_loras 8, max_cpu_loras 16
        return with_flag("many_ml8", "--max-cpu-loras", 16, env)

    def many_slots(n: int, env: dict) -> LaunchSpec:
        # all adapters listed, the planner's max_cpu_loras, max_loras n (fewer distinct adapters per step)
        return with_flag("many_auto", "--max-loras", n, env)

    PDL = {"PEFTDEPLOY_LORA_PDL": "1"}
    catalog.update({
        **{f"many_ml{n}_pd": (f"{a.many} adapters, planner's max_cpu_loras, max_loras {n}, peftdeploy kernels",
                              (lambda n=n: many_slots(n, PDK)), n,
                              [(f"{zm}, max_loras {n}, peftdeploy kernels", many_names)], "graphs")
           for n in (16, 24, 32)},
        "plain_pd_pdl": (f"multi-LoRA, peftdeploy's kernels with PEFTDEPLOY_LORA_PDL=1, max_loras {ml}",
                         lambda: with_env(plain, **PDK, **PDL), ml,
                         [(f"multi-LoRA, peftdeploy kernels + PDL, {zl}", zipf)], "graphs"),
        "plain_pd_act": (f"multi-LoRA, peftdeploy's kernels with PEFTDEPLOY_LORA_ACT_FUSE=1, max_loras {ml}",
                         lambda: with_env(plain, **PDK, PEFTDEPLOY_LORA_ACT_FUSE="1"), ml,
                         [(f"multi-LoRA, peftdeploy kernels + gate_up expand in the activation, {zl}", zipf)],
                         "graphs"),
        "plain_pd_fused": (f"multi-LoRA, peftdeploy's kernels with PEFTDEPLOY_LORA_ACT_FUSE=1 and "
                           f"PEFTDEPLOY_LORA_NORM_FUSE=1, max_loras {ml}",
                           lambda: with_env(plain, **PDK, **FUSED_ENV), ml,
                           [(f"multi-LoRA, peftdeploy kernels + expands in the activation and the norms, {zl}",
                             zipf)], "graphs"),
        "plain_vllm": (f"multi-LoRA, vLLM's kernels (PEFTDEPLOY_LORA_KERNELS=vllm), max_loras {ml}",
                       lambda: with_env(plain, **VK), ml, [(f"multi-LoRA, vLLM kernels, {zl}", zipf)], "graphs"),
        "plain_pd": (f"multi-LoRA, peftdeploy's kernels (PEFTDEPLOY_LORA_KERNELS=peftdeploy), max_loras {ml}",
                     lambda: with_env(plain, **PDK), ml, [(f"multi-LoRA, peftdeploy kernels, {zl}", zipf)], "graphs"),
        "plain_pd_base": ("peftdeploy kernels server, base traffic only", lambda: with_env(plain, **PDK), ml,
                          [("LoRA on (peftdeploy kernels), base traffic only", ())], "graphs"),
        "many_ml8_vllm": (f"{a.many} adapters, max_loras 8 / max_cpu_loras 16, vLLM kernels", lambda: many_ml8(VK), 8,
                          [(f"{zm}, max_loras 8 / cpu 16, vLLM kernels", many_names)], "graphs"),
        "many_ml8_pd": (f"{a.many} adapters, max_loras 8 / max_cpu_loras 16, peftdeploy kernels",
                        lambda: many_ml8(PDK), 8, [(f"{zm}, max_loras 8 / cpu 16, peftdeploy kernels", many_names)],
                        "graphs"),
        "many_auto_pd": (f"{a.many} adapters, planner auto sizing from policy.traffic, peftdeploy kernels",
                         lambda: with_env(plans["many_auto"]["spec"], **PDK), None,
                         [(f"{zm}, planner auto, peftdeploy kernels", many_names)], "graphs"),
        "many_auto_vllm": (f"{a.many} adapters, planner auto sizing from policy.traffic, vLLM kernels",
                           lambda: with_env(plans["many_auto"]["spec"], **VK), None,
                           [(f"{zm}, planner auto, vLLM kernels", many_names)], "graphs"),
        "profile_pd": ("peftdeploy kernels with the torch profiler (Zipf adapters)",
                       lambda: variant(with_env(plain, **PDK), adapters=names, extra_args=[PROF]), ml, [], "profile"),
        "profile_vllm": ("vLLM kernels with the torch profiler (Zipf adapters)",
                         lambda: variant(with_env(plain, **VK), adapters=names, extra_args=[PROF]), ml, [],
                         "profile"),
        "profile_merged": ("merged model (no LoRA) with the torch profiler",
                           lambda: variant(plain, adapters=None, mode="merge", extra_args=[PROF]), None, [],
                           "profile"),
        "kagree": ("bf16 greedy agreement, 4-layer real-random-weights model, eager: vLLM vs peftdeploy kernels",
                   None, ml, [], "agreement"),
        "kagree_fused": ("bf16 greedy agreement as kagree, peftdeploy kernels with the expands in the activation "
                         "and the norms (PEFTDEPLOY_LORA_ACT_FUSE=1 PEFTDEPLOY_LORA_NORM_FUSE=1)", None, ml, [],
                         "agreement"),
        "many_auto_pd_fused": (f"{a.many} adapters, planner auto sizing, peftdeploy kernels + the expands in the "
                               "activation and the norms",
                               lambda: with_env(plans["many_auto"]["spec"], **PDK, **FUSED_ENV), None,
                               [(f"{zm}, planner auto, peftdeploy kernels + expands in activation and norms",
                                 many_names)], "graphs"),
        "pd_mix": (f"multi-LoRA, peftdeploy's kernels, max_loras {ml}: {zl}, then base traffic only on the same server",
                   lambda: with_env(plain, **PDK), ml,
                   [(f"multi-LoRA, peftdeploy kernels, {zl}", zipf),
                    ("LoRA on (peftdeploy kernels), base traffic only", ())], "graphs"),
        "pd_ds": (f"multi-LoRA, peftdeploy's kernels + VLLM_LORA_ENABLE_DUAL_STREAM=1, max_loras {ml}",
                  lambda: with_env(plain, **PDK, **DS), ml,
                  [(f"multi-LoRA, peftdeploy kernels + dual stream, {zl}", zipf)], "graphs"),
    })
    exe = (a.python, "-m", "vllm.entrypoints.cli.main")

    def wl(adapt: tuple[str, ...], n: int, seed: int, base_name: str) -> WorkloadConfig:
        return WorkloadConfig(adapters=adapt, base_model=base_name, zipf_alpha=a.zipf,
                              base_share=0.0 if adapt else 1.0, num_requests=n, concurrency=a.concurrency,
                              input_len=a.input_len, output_len=a.output_len, seed=seed)

    if a.dry_run:
        for tag in wanted:
            desc, fac, _, setups, kind = catalog[tag]
            if fac is None:
                print(f"# {tag}: {desc}")
                continue
            spec = fac()
            print(f"# server {tag}: {desc}\n{' '.join(f'{k}={v}' for k, v in spec.env)} {shlex.join(spec.argv(exe))}")
            for label, adapt in setups:
                w = build_workload(wl(adapt, a.num_requests, 0, spec.served_model_name))
                print(f"#   setup {label!r}: {len(w.requests)} requests, per model {w.counts()}, "
                      f"models {sorted({r.model for r in w.requests})}")
        for tag, p in plans.items():
            print(f"# planner {tag}: {p.get('error') or p.get('kv', {}).get('kv_tokens')} KV tokens predicted")
        print(f"# Zipf shares: {shares}")
        return 0

    logs: list[Path] = []

    def pack_logs() -> None:
        import tarfile

        try:
            with tarfile.open(out / "logs.tar.gz", "w:gz") as tf:
                for p in logs:
                    if p.exists():
                        tf.add(p, arcname=p.name)
        except Exception as e:  # noqa: BLE001
            log(f"pack logs: {e}")

    ref = {"tok_s": None}
    done = set(DONE.read_text().split()) if a.skip_done and DONE.exists() else set()
    for tag in wanted:
        desc, fac, max_loras, setups, kind = catalog[tag]
        if tag in done:
            log(f"skipping {tag}: measured by an earlier call ({DONE})")
            continue
        elapsed = time.time() - t_begin
        if elapsed + EST_S[kind] > a.deadline_s:
            log(f"skipping {tag}: {elapsed:.0f} s elapsed, needs ~{EST_S[kind]} s, deadline {a.deadline_s:.0f} s")
            result["servers"][tag] = {"skipped": f"deadline ({elapsed:.0f} s elapsed)", "description": desc}
            save()
            continue
        try:
            if tag in ("hybrid", "hybrid_tuned"):
                t1 = time.time()
                build_deltas(lora_dir, names, delta_dir)
                log(f"delta adapters ready in {time.time() - t1:.0f} s")
            if tag in ("kagree", "kagree_fused"):
                key = "kernel_agreement" + tag[len("kagree"):]
                result[key] = run_kernel_agreement(a, exe, out, logs, fused=tag == "kagree_fused")
                save()
                pack_logs()
                continue
            if kind == "agreement":
                result["agreement"] = run_agreement(a, exe, out, logs)
                save()
                pack_logs()
                if "hybrid_vs_plain" in result["agreement"]:
                    with open(DONE, "a") as f:
                        f.write(tag + "\n")
                continue
            spec = fac()
            srv = Server(spec, log_path=tmp / f"vllm_{tag}.log", executable=exe, ready_timeout_s=300)
            logs.append(srv.log_path)
            _current[0] = srv
            log(f"[{tag}] {' '.join(f'{k}={v}' for k, v in spec.env)} {shlex.join(srv.argv())}")
            try:
                srv.start()
            except Exception as e:  # noqa: BLE001
                log(f"[{tag}] failed to start: {str(e)[-2000:]}")
                result["servers"][tag] = {"error": str(e)[-3000:], "description": desc}
                save()
                pack_logs()
                continue
            try:
                text = srv.log_path.read_text(errors="replace")
                kv = parse_kv(text)
                pl = plans.get("merged" if tag == "merged" else "plain" if tag in ("plain", "tuned", "ds", "sp") else "", {})
                pred = dict(pl.get("kv") or {})
                err = None
                if kv.get("kv_tokens") and pred.get("kv_tokens"):
                    err = (pred["kv_tokens"] - kv["kv_tokens"]) / kv["kv_tokens"]
                result["servers"][tag] = {"description": desc, "argv": srv.argv(), "env": dict(spec.env),
                                          "ready_s": srv.ready_s, "vllm_kv": kv,
                                          "planner_kv": pred or None, "kv_prediction_error": err,
                                          "log_lines": [ln for ln in text.splitlines()
                                                        if re.search(r"KV cache|Maximum concurrency|CUDA graph|"
                                                                     r"Model loading took|torch.compile|cudagraph|"
                                                                     r"memory profiling|Available KV|LoRA kernels", ln)][-24:]}
                log(f"[{tag}] ready in {srv.ready_s:.0f} s; vLLM KV {kv}; planner {pred.get('kv_tokens')}"
                    + (f" ({err * 100:+.2f}%)" if err is not None else ""))
                save()
                served = spec.served_model_name
                for label, adapt in setups:
                    run_workload_sync(srv.url, build_workload(wl(adapt, a.warmup_requests, 1000, served)))
                    sums = []
                    for i in range(a.runs):
                        w = build_workload(wl(adapt, a.num_requests, i, served))  # run i: seed i
                        rr = run_workload_sync(srv.url, w)
                        s = report.summarize(rr, w)
                        sums.append(s)
                        o = s["overall"]
                        log(f"  {label} run {i + 1}: {o['output_tok_s']:.0f} out tok/s, TTFT p50 "
                            f"{(o['ttft_s']['p50'] or 0) * 1000:.0f} ms, TPOT p50 "
                            f"{(o['tpot_s']['p50'] or 0) * 1000:.1f} ms, errors {o['errors']}, per model "
                            f"{w.counts()}")
                    med = report.median_summary(sums)
                    mo = med["overall"]
                    row = {"setup": label, "server": tag, "max_loras": max_loras, "adapters": list(adapt),
                           "output_tok_s": mo["output_tok_s"], "req_s": mo["req_s"],
                           "runs_tok_s": [x["overall"]["output_tok_s"] for x in sums],
                           "ttft_p50": mo["ttft_s"]["p50"], "ttft_p99": mo["ttft_s"]["p99"],
                           "tpot_p50": mo["tpot_s"]["p50"], "tpot_p99": mo["tpot_s"]["p99"],
                           "e2e_p50": mo["e2e_s"]["p50"], "e2e_p99": mo["e2e_s"]["p99"],
                           "errors": med["errors_total"], "median": med}
                    if tag == "merged":
                        ref["tok_s"] = row["output_tok_s"]
                    row["ratio"] = row["output_tok_s"] / ref["tok_s"] if ref["tok_s"] and row["output_tok_s"] else None
                    result["setups"].append(row)
                    save()
                if kind == "profile":
                    result.setdefault("profiles", {})[tag] = run_profile(
                        srv, a, () if tag == "profile_merged" else zipf, served, out / tag)
                    save()
                with open(DONE, "a") as f:
                    f.write(tag + "\n")
            finally:
                srv.stop()
                _current[0] = None
                log(f"[{tag}] stopped")
                pack_logs()
        except Exception as e:  # noqa: BLE001 - keep going with the next server
            import traceback

            log(f"[{tag}] FAILED: {type(e).__name__}: {e}")
            result["servers"].setdefault(tag, {})["error"] = traceback.format_exc()[-3000:]
            save()

    rows = [r for r in result["setups"] if "output_tok_s" in r]
    from peftdeploy.bench.compare import ratio_rows

    head, trows = ratio_rows(rows)
    md = [f"GPU: {result['gpu']}; vLLM {result['vllm']}; Llama-3-8B-shaped, dummy weights, bf16; "
          f"{a.n_loras} random rank-{a.rank} all-linear adapters; closed loop {a.concurrency} concurrent, "
          f"{a.input_len}-word prompts, {a.output_len} output tokens; median of {a.runs} runs after warm-up",
          "", report.format_table(head, trows) if trows else "(no throughput rows in this call)", ""]
    md.append("| server | vLLM KV tokens | planner predicted | error | ready s |")
    md.append("|---|---|---|---|---|")
    for tag, s in result["servers"].items():
        vk = (s.get("vllm_kv") or {}).get("kv_tokens")
        pk = (s.get("planner_kv") or {}).get("kv_tokens")
        e = s.get("kv_prediction_error")
        md.append(f"| {tag} | {vk if vk is not None else '-'} | {pk if pk is not None else '-'} | "
                  f"{f'{e * 100:+.2f}%' if e is not None else '-'} | {s.get('ready_s') or s.get('skipped') or s.get('error', '')[:60]} |")
    if result.get("agreement"):
        md.append("")
        md.append("agreement: " + json.dumps(result["agreement"].get("summary"), default=str))
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["total_s"] = time.time() - t_begin
    save()
    (out / "gpu_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    log(f"total {time.time() - t_begin:.0f} s")
    return 0 if rows or result.get("agreement") else 1


def run_profile(srv: Server, a: argparse.Namespace, zipf: tuple[str, ...], served: str, out: Path) -> dict:
    """/start_profile, a short Zipf burst, /stop_profile; keep vLLM's key_averages table (CUDA time)."""
    import glob
    import threading
    import urllib.request

    def post(path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(srv.url + path, data=b"", method="POST"), timeout=300).read()

    import shutil

    shutil.rmtree("/tmp/vllm_prof", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    w = build_workload(WorkloadConfig(adapters=zipf, base_model=served, zipf_alpha=a.zipf, num_requests=128,
                                      concurrency=a.concurrency, input_len=a.input_len, output_len=a.output_len,
                                      seed=77))
    run_workload_sync(srv.url, build_workload(WorkloadConfig(adapters=zipf, base_model=served, zipf_alpha=a.zipf,
                                                             num_requests=16, concurrency=16, input_len=a.input_len,
                                                             output_len=16, seed=78)))  # warm-up
    t0 = time.time()
    post("/start_profile")
    th = threading.Thread(target=run_workload_sync, args=(srv.url, w))
    th.start()
    th.join()
    post("/stop_profile")
    tables = sorted(glob.glob("/tmp/vllm_prof/**/profiler_out_*.txt", recursive=True))
    res: dict = {"seconds": time.time() - t0, "tables": tables}
    if tables:
        text = Path(tables[0]).read_text(errors="replace")
        (out / "profile_table.txt").write_text(text)
        res["summary"] = summarize_profile(text)
    traces = sorted(glob.glob("/tmp/vllm_prof/**/*.json*", recursive=True), key=lambda t: -os.path.getsize(t))
    if traces:
        try:
            res["timeline"] = trace_timeline(traces[0])
        except Exception as e:  # noqa: BLE001 - a table without the timeline is still worth keeping
            res["timeline"] = {"error": f"{type(e).__name__}: {e}"}
        shutil.copy(traces[0], out / Path(traces[0]).name)
    log(f"  profile: {res.get('summary')}")
    log(f"  timeline: {res.get('timeline')}")
    return res


def trace_timeline(path: str) -> dict:
    """GPU busy time vs wall time over the profiled steps, from the torch profiler's Chrome trace.

    Steps are vLLM's ``execute_context_*`` GPU annotations; busy = the union of kernel and memcpy
    intervals. Per step: GPU span, busy time inside it, and the idle gap before the next step (host-bound
    time: the GPU waits for the next step's launch), plus the LoRA kernels' share of busy time. Host side:
    the median CPU duration of each of vLLM's ``gpu_model_runner: *`` phases (preprocess, forward, ...),
    so a host-bound step shows which phase holds the GPU up."""
    import bisect
    import gzip

    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        ev = json.load(f)
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    kern = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", ""))) for e in ev
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), str(e.get("name", ""))) for e in ev
                   if e.get("ph") == "X" and e.get("cat") == "gpu_user_annotation"
                   and str(e.get("name", "")).startswith("execute_context"))
    if not kern:
        return {"error": "no kernels in the trace"}
    starts = [k[0] for k in kern]
    maxdur = max(k[1] - k[0] for k in kern)
    lora_words = ("lora", "sgmv", "bgmv", "shrink", "expand")

    def busy(lo: float, hi: float) -> tuple[float, float, int]:
        tot = lora = 0.0
        n = 0
        cur_s = cur_e = None
        for i in range(bisect.bisect_left(starts, lo - maxdur), len(kern)):
            s0, e0, name = kern[i]
            if s0 >= hi:
                break
            if e0 <= lo:
                continue
            n += 1
            s0, e0 = max(s0, lo), min(e0, hi)
            if any(x in name.lower() for x in lora_words):
                lora += e0 - s0
            if cur_e is None or s0 > cur_e:
                if cur_e is not None:
                    tot += cur_e - cur_s
                cur_s, cur_e = s0, e0
            else:
                cur_e = max(cur_e, e0)
        if cur_e is not None:
            tot += cur_e - cur_s
        return tot, lora, n

    rows = []
    for i, (s0, e0, name) in enumerate(steps):
        b, lo_, n = busy(s0, e0)
        gap = steps[i + 1][0] - e0 if i + 1 < len(steps) else None
        rows.append({"name": name, "span_us": e0 - s0, "busy_us": b, "lora_us": lo_, "kernels": n,
                     "gap_after_us": gap})
    lo, hi = kern[0][0], kern[-1][1]
    b, lo_, n = busy(lo, hi)
    out: dict = {"window_us": hi - lo, "busy_us": b, "busy_frac": b / (hi - lo) if hi > lo else None,
                 "lora_kernel_us": lo_, "kernels": n, "steps": len(rows)}
    med = statistics.median
    if rows:
        gaps = [r["gap_after_us"] for r in rows if r["gap_after_us"] is not None]
        out.update(step_span_us_median=med(r["span_us"] for r in rows),
                   step_busy_us_median=med(r["busy_us"] for r in rows),
                   step_lora_us_median=med(r["lora_us"] for r in rows),
                   step_kernels_median=med(r["kernels"] for r in rows),
                   gap_us_median=med(gaps) if gaps else None, gap_us_sum=sum(gaps) if gaps else None,
                   per_step=rows[:80])
    host: dict[str, list[float]] = {}
    for e in ev:
        nm = str(e.get("name", ""))
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and nm.startswith("gpu_model_runner: "):
            host.setdefault(nm.split(": ", 1)[1], []).append(float(e.get("dur", 0)))
    out["host_phase_us_median"] = {k: round(med(v), 1) for k, v in sorted(host.items())}
    out["host_phase_count"] = {k: len(v) for k, v in sorted(host.items())}
    return out


def summarize_profile(text: str) -> dict:
    """Self CUDA time by kernel class from torch's key_averages table (sorted by self CUDA time)."""
    lines = text.splitlines()
    hdr = next((ln for ln in lines if "Self CUDA" in ln), None)
    if hdr is None:
        return {}
    cols = re.split(r"\s{2,}", hdr.strip())
    try:
        ci = cols.index("Self CUDA")
    except ValueError:
        return {}
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    cls: dict[str, float] = {}
    total = 0.0
    for ln in lines:
        parts = re.split(r"\s{2,}", ln.strip())
        if len(parts) != len(cols) or parts[0] == cols[0]:
            continue
        m = re.match(r"([\d.]+)(us|ms|s)$", parts[ci])
        if not m:
            continue
        t = float(m.group(1)) * unit[m.group(2)]
        name = parts[0].lower()
        if any(x in name for x in ("lora", "sgmv", "bgmv", "shrink", "expand")):
            k = "lora"
        elif any(x in name for x in ("flash", "attn", "attention", "fmha")):
            k = "attention"
        elif any(x in name for x in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "mm_")):
            k = "gemm"
        elif name.startswith(("aten::", "vllm::", "cuda", "profilerstep", "execute_")):
            continue  # CPU-side ops that aggregate kernels: skip (kernels are counted by name)
        else:
            k = "other kernels"
        cls[k] = cls.get(k, 0.0) + t
        total += t
    return {"by_class_s": cls, "share": {k: v / total for k, v in cls.items()} if total else {}}


def summary(res: dict, keys: tuple[str, ...]) -> dict:
    """Mean agreement measures over the model names of each comparison in `res` that has any."""
    out = {}
    for k in keys:
        v = [x for x in res.get(k, {}).values() if x.get("n")]
        if v:
            out[k] = {m: statistics.mean(x[m] for x in v) for m in ("token_agreement", "sequences_identical",
                                                                   "prefix_agreement")}
    return out


def run_agreement(a: argparse.Namespace, exe: tuple[str, ...], out: Path, logs: list[Path]) -> dict:
    """bf16 greedy tokens: plain multi-LoRA (W, l0..l7) vs hybrid (W + l0 merged; base and l1..l7 as deltas)
    for every model name, on a 4-layer model with real random weights (dummy weights cannot carry a merge)."""
    t0 = time.time()
    root = Path("/tmp/agree")
    assets = make_small_assets(root, a.n_loras, a.rank)
    names = [f"l{i}" for i in range(a.n_loras)]
    log(f"[agreement] assets in {time.time() - t0:.0f} s")
    rng = __import__("random").Random(5)
    prompts = [synthetic_prompt(rng, 40 + 7 * i) for i in range(16)]
    common = [("--dtype", "bfloat16"), ("--max-model-len", "1024"), ("--gpu-memory-utilization", "0.3"),
              ("--max-num-seqs", "64"), ("--enforce-eager", None), ("--host", "127.0.0.1"), ("--port", str(a.port)),
              ("--enable-lora", None), ("--max-loras", "8"), ("--max-cpu-loras", "8")]
    specs = {
        "plain": LaunchSpec(recipe_name="agree", recipe_hash="-", mode="serve", model=str(assets["model"]),
                            model_source="random", served_model_name="base", host="127.0.0.1", port=a.port,
                            device="cuda", args=(("--served-model-name", "base"), *common, ("--max-lora-rank", str(a.rank)), ("--lora-modules", None),
                                                 *((f"{n}={assets['loras'] / f'lora{i}'}", None) for i, n in enumerate(names)))),
        "hybrid": LaunchSpec(recipe_name="agree", recipe_hash="-", mode="hybrid", model=str(assets["merged"]),
                             model_source="random", served_model_name=names[0], host="127.0.0.1", port=a.port,
                             device="cuda", args=(("--served-model-name", names[0]), *common,
                                                  ("--max-lora-rank", str(2 * a.rank)), ("--lora-modules", None),
                                                  *((f"{n}={assets['delta'] / n}", None) for n in ["base", *names[1:]]))),
    }
    outs: dict[str, dict[str, list]] = {}
    res: dict = {"model": {k: SMALL[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
                 "prompts": len(prompts), "max_tokens": 48, "note": "eager, bf16, greedy; token strings as ids"}
    for tag, spec in specs.items():
        srv = Server(spec, log_path=Path("/tmp") / f"vllm_agree_{tag}.log", executable=exe, ready_timeout_s=240)
        logs.append(srv.log_path)
        _current[0] = srv
        log(f"[agreement/{tag}] {shlex.join(srv.argv())}")
        try:
            srv.start()
            log(f"[agreement/{tag}] ready in {srv.ready_s:.0f} s")
            outs[tag] = {n: greedy(srv.url, n, prompts, 48, 16) for n in ["base", *names]}
            if tag == "plain":  # noise floor: same server, same prompts, one at a time instead of 16 in flight
                outs["plain_serial"] = {n: greedy(srv.url, n, prompts, 48, 1) for n in ["base", names[0], names[1]]}
                # how much the adapters change the outputs at all
                res["adapter_vs_base_agreement"] = {n: agreement(outs["plain"][n], outs["plain"]["base"])
                                                    for n in names}
        except Exception as e:  # noqa: BLE001
            res[f"{tag}_error"] = str(e)[-2000:]
            log(f"[agreement/{tag}] failed: {str(e)[-1500:]}")
        finally:
            srv.stop()
            _current[0] = None
    if "plain" in outs and "hybrid" in outs:
        res["hybrid_vs_plain"] = {n: agreement(outs["hybrid"][n], outs["plain"][n]) for n in ["base", *names]}
    if "plain_serial" in outs:
        res["plain_batch16_vs_serial"] = {n: agreement(outs["plain"][n], outs["plain_serial"][n])
                                          for n in outs["plain_serial"]}
    res["summary"] = summary(res, ("hybrid_vs_plain", "plain_batch16_vs_serial", "adapter_vs_base_agreement"))
    summ = res["summary"]
    res["seconds"] = time.time() - t0
    log(f"[agreement] {json.dumps(summ)}")
    return res


def run_kernel_agreement(a: argparse.Namespace, exe: tuple[str, ...], out: Path, logs: list[Path],
                         fused: bool = False) -> dict:
    """bf16 greedy tokens of the same LoRA server with vLLM's kernels and with peftdeploy's (with `fused`:
    the expands inside the activation and the norms, FUSED_ENV), for the bare backbone and every adapter,
    16 requests in flight, on the 4-layer real-random-weights model (eager); the noise floor is vLLM's own
    server batched (16 in flight) vs alone (1 in flight)."""
    t0 = time.time()
    assets = make_small_assets(Path("/tmp/agree"), a.n_loras, a.rank)
    names = [f"l{i}" for i in range(a.n_loras)]
    rng = __import__("random").Random(5)
    prompts = [synthetic_prompt(rng, 40 + 7 * i) for i in range(16)]
    args = (("--served-model-name", "base"), ("--dtype", "bfloat16"), ("--max-model-len", "1024"),
            ("--gpu-memory-utilization", "0.3"), ("--max-num-seqs", "64"), ("--enforce-eager", None),
            ("--host", "127.0.0.1"), ("--port", str(a.port)), ("--enable-lora", None), ("--max-loras", "4"),
            ("--max-cpu-loras", "8"), ("--max-lora-rank", str(a.rank)), ("--lora-modules", None),
            *((f"{n}={assets['loras'] / f'lora{i}'}", None) for i, n in enumerate(names)))
    outs: dict[str, dict[str, list]] = {}
    res: dict = {"prompts": len(prompts), "max_tokens": 48, "max_loras": 4, "adapters": len(names),
                 "fused": fused, "note": "eager, bf16, greedy; 8 adapters over 4 slots + base, 16 in flight"}
    for tag in ("vllm", "peftdeploy"):
        spec = LaunchSpec(recipe_name="kagree", recipe_hash="-", mode="serve", model=str(assets["model"]),
                          model_source="random", served_model_name="base", host="127.0.0.1", port=a.port,
                          device="cuda", args=args,
                          env=(("PEFTDEPLOY_LORA_KERNELS", tag),
                               *(tuple(FUSED_ENV.items()) if fused and tag == "peftdeploy" else ())))
        srv = Server(spec, log_path=Path("/tmp") / f"vllm_kagree{'_fused' if fused else ''}_{tag}.log", executable=exe, ready_timeout_s=240)
        logs.append(srv.log_path)
        _current[0] = srv
        try:
            srv.start()
            text = srv.log_path.read_text(errors="replace")
            res[f"{tag}_kernel_log"] = [ln for ln in text.splitlines() if "LoRA kernels" in ln][:4]
            log(f"[kagree/{tag}] ready in {srv.ready_s:.0f} s; {res[f'{tag}_kernel_log']}")
            outs[tag] = {n: greedy(srv.url, n, prompts, 48, 16) for n in ["base", *names]}
            if tag == "vllm":
                outs["vllm_serial"] = {n: greedy(srv.url, n, prompts, 48, 1) for n in ["base", *names[:3]]}
        except Exception as e:  # noqa: BLE001
            res[f"{tag}_error"] = str(e)[-2000:]
            log(f"[kagree/{tag}] failed: {str(e)[-1500:]}")
        finally:
            srv.stop()
            _current[0] = None
    if "vllm" in outs and "peftdeploy" in outs:
        res["peftdeploy_vs_vllm"] = {n: agreement(outs["peftdeploy"][n], outs["vllm"][n]) for n in ["base", *names]}
    if "vllm_serial" in outs:
        res["vllm_batch16_vs_serial"] = {n: agreement(outs["vllm"][n], outs["vllm_serial"][n]) for n in outs["vllm_serial"]}
        res["adapter_vs_base"] = {n: agreement(outs["vllm"][n], outs["vllm"]["base"]) for n in names}
    res["summary"] = summary(res, ("peftdeploy_vs_vllm", "vllm_batch16_vs_serial", "adapter_vs_base"))
    summ = res["summary"]
    res["seconds"] = time.time() - t0
    log(f"[kagree] {json.dumps(summ)}")
    return res


if __name__ == "__main__":
    sys.exit(main())
