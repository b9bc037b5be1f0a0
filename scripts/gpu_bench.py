#!/usr/bin/env python3
"""GPU run of issue 10: merged vs unmerged multi-LoRA throughput and latency on an 8B-shaped model,
plus the planner's KV-cache prediction against what vLLM reports.

Self-contained for an offline GPU machine (see scripts/gpu_bench.sh, which prepares vLLM 0.26 and
calls this): needs torch, safetensors, tokenizers, transformers (model + adapters), vLLM, and
aiohttp or httpx (peftdeploy's load generator). Run from the repository root.

Steps:
1. /tmp/m: a Llama-3-8B-shaped config.json + a locally built byte-level tokenizer (no weights:
   vLLM's ``--load-format dummy``); /tmp/loras/lora{i}: 8 random rank-16 PEFT adapters on all
   linear layers (q,k,v,o,gate,up,down).
2. Server A, no LoRA (= the speed of a merged model: same architecture, same shapes).
   Server B, ``--enable-lora --max-loras 8``: LoRA-enabled base traffic; 1 adapter; 8 adapters
   Zipf(1.0). Optional server C (``--with-max-loras-4``): 8 adapters Zipf(1.0) at max_loras 4.
   Both with CUDA graphs (no --enforce-eager).
3. peftdeploy's own load generator (peftdeploy.bench): closed loop, 64 concurrent, ~200-word
   prompts, 128 output tokens (ignore_eos), 1 warm-up run + 2 measured runs; median.
4. KV cache: "GPU KV cache size: N tokens" from each server's log vs the planner's prediction
   (peftdeploy.plan.memory with the same engine arguments).
Writes $OUT/gpu_bench.json (after every setup, so a cut-off run keeps what it measured),
$OUT/gpu_bench.md (the table), $OUT/gpu_bench.png and the server logs.
"""
from __future__ import annotations

import argparse
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
from peftdeploy.bench.workload import WorkloadConfig, build_workload  # noqa: E402
from peftdeploy.launch.spec import LaunchSpec, ServedAdapter  # noqa: E402

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
def make_model(model_dir: Path) -> None:
    """config.json + generation_config.json + a byte-level BPE tokenizer of exactly V tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(CFG, indent=1))
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


def make_adapters(lora_dir: Path, n: int, rank: int, model_dir: Path) -> list[Path]:
    """n random PEFT LoRA adapters, all linear layers, B != 0 so they change the outputs."""
    import torch
    from safetensors.torch import save_file

    out = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = lora_dir / f"lora{i}"
        out.append(d)
        if (d / "adapter_model.safetensors").exists():
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
        from peftdeploy.inspect import model_info_from_config
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
                 max_loras: int | None) -> Path:
    """A peftdeploy recipe describing this benchmark setup (what a user would write)."""
    lines = ["apiVersion: peftdeploy/v1", "name: gpu-bench-8b", "backbone:", f"  model: {model_dir}",
             "  dtype: bfloat16", f"  max_model_len: {a.max_model_len}"]
    if n_adapters:
        lines.append("adapters:")
        for i in range(n_adapters):
            lines += [f"  - name: l{i}", f"    source: {lora_dir / f'lora{i}'}"]
    lines += ["policy:", "  mode: serve", "  dynamic_loading: false", "serving:", "  host: 127.0.0.1",
              f"  port: {a.port}", f"  gpu_memory_utilization: {a.gpu_memory_utilization}",
              f"  max_num_seqs: {a.max_num_seqs}"]
    if n_adapters:
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


def main() -> int:
    import atexit
    import signal

    atexit.register(_stop_current)
    signal.signal(signal.SIGTERM, _stop_current)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu")
    ap.add_argument("--model-dir", default="/tmp/m")
    ap.add_argument("--lora-dir", default="/tmp/loras")
    ap.add_argument("--n-loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--python", default=sys.executable, help="Python that runs vLLM")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=384)
    ap.add_argument("--input-len", type=int, default=200, help="prompt words")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup-requests", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--with-max-loras-4", action="store_true", help="also a third server at max_loras 4")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (no CUDA graphs)")
    ap.add_argument("--deadline-s", type=float, default=500.0,
                    help="skip setups that would start after this many seconds (one device call is <= 600 s)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and server commands, run nothing")
    ap.add_argument("--no-planner", action="store_true", help="build the server flags here instead of make_plan")
    a = ap.parse_args()
    t_begin = time.time()
    out = Path(a.out)
    out_recipes = Path("/tmp/gpu_bench_recipes") if not a.dry_run else Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_bench_recipes_dry"
    model_dir, lora_dir = Path(a.model_dir), Path(a.lora_dir)
    names = [f"l{i}" for i in range(a.n_loras)]
    adapters = tuple(ServedAdapter(name=n, path=str(lora_dir / f"lora{i}"), source=f"random://{i}", rank=a.rank)
                     for i, n in enumerate(names))

    if not a.dry_run:
        out.mkdir(parents=True, exist_ok=True)
        result: dict = {"config": {k: v for k, v in vars(a).items()}, "model": CFG, "setups": [], "servers": {},
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            result["gpu"] = None
        try:
            import importlib.metadata as md

            result["vllm"] = md.version("vllm")
        except Exception:  # noqa: BLE001
            result["vllm"] = subprocess.run([a.python, "-c", "import vllm; print(vllm.__version__)"],
                                            capture_output=True, text=True).stdout.strip() or "?"
        log(f"GPU: {result['gpu']}; vLLM {result['vllm']}")
        t0 = time.time()
        make_model(model_dir)
        make_adapters(lora_dir, a.n_loras, a.rank, model_dir)
        log(f"model + {a.n_loras} adapters ready in {time.time() - t0:.0f} s")
        gpu_bytes = gpu_total_bytes()
    else:
        gpu_bytes = None

    plans: dict[str, dict] = {}
    base_spec = None
    if not a.no_planner:
        # The planner's own LaunchSpec and memory prediction, from a recipe describing this setup.
        for tag, n_ad, ml in (("nolora", 0, None), ("lora8", a.n_loras, min(8, a.n_loras)),
                              ("lora4", a.n_loras, 4)):
            rp = write_recipe(out_recipes / f"{tag}.yaml", a, model_dir, lora_dir, n_ad, ml)
            plans[tag] = plan_for(rp, gpu_bytes=gpu_bytes, dry_run=a.dry_run)
        if "spec" in plans["lora8"]:
            base_spec = plans["lora8"]["spec"]
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
    if a.eager:
        base_spec = variant(base_spec, adapters=[x.name for x in base_spec.adapters] or None,
                            extra_args=[("--enforce-eager", None)])
    names = [x.name for x in base_spec.adapters] or names
    served = base_spec.served_model_name
    servers = [("nolora", variant(base_spec, adapters=None, mode="merge"), None),
               ("lora8", variant(base_spec, adapters=names, max_loras=min(8, a.n_loras), max_lora_rank=a.rank),
                min(8, a.n_loras))]
    if a.with_max_loras_4:
        servers.append(("lora4", variant(base_spec, adapters=names, max_loras=4, max_lora_rank=a.rank), 4))
    # setups: (name, server tag, adapters (hottest first; () = base model))
    setups = [("no LoRA (= merged model)", "nolora", ()),
              ("LoRA on, base traffic", "lora8", ()),
              ("1 adapter", "lora8", (names[0],)),
              (f"{a.n_loras} adapters Zipf({a.zipf:g}), max_loras {min(8, a.n_loras)}", "lora8", tuple(names))]
    if a.with_max_loras_4:
        setups.append((f"{a.n_loras} adapters Zipf({a.zipf:g}), max_loras 4", "lora4", tuple(names)))
    exe = (a.python, "-m", "vllm.entrypoints.cli.main")

    def wl(adapt: tuple[str, ...], n: int, seed: int) -> WorkloadConfig:
        return WorkloadConfig(adapters=adapt, base_model=served, zipf_alpha=a.zipf,
                              base_share=0.0 if adapt else 1.0, num_requests=n, concurrency=a.concurrency,
                              input_len=a.input_len, output_len=a.output_len, seed=seed)

    if a.dry_run:
        for tag, spec, _ in servers:
            print(f"# server {tag}\n{' '.join(f'{k}={v}' for k, v in spec.env)} {shlex.join(spec.argv(exe))}")
        for tag, p in plans.items():
            print(f"# planner {tag}: {p.get('error') or p.get('kv', {}).get('kv_tokens')} KV tokens predicted")
        for name, tag, adapt in setups:
            w = build_workload(wl(adapt, a.num_requests, 0))
            print(f"# setup {name!r} on {tag}: {len(w.requests)} requests, concurrency {a.concurrency}, "
                  f"{a.input_len} words in, {a.output_len} tokens out, per model {w.counts()}")
        return 0

    def save() -> None:
        report.write_json(result, out / "gpu_bench.json")

    ref_tok_s = None
    for tag, spec, max_loras in servers:
        elapsed = time.time() - t_begin
        if elapsed > a.deadline_s - 150:
            log(f"skipping server {tag}: {elapsed:.0f} s elapsed, deadline {a.deadline_s:.0f} s")
            result["servers"][tag] = {"skipped": f"deadline ({elapsed:.0f} s elapsed)"}
            save()
            continue
        srv = Server(spec, log_path=out / f"vllm_{tag}.log", executable=exe, ready_timeout_s=300)
        _current[0] = srv
        log(f"[{tag}] {shlex.join(srv.argv())}")
        try:
            srv.start()
        except Exception as e:  # noqa: BLE001
            log(f"[{tag}] failed to start: {e}")
            result["servers"][tag] = {"error": str(e)[-3000:]}
            save()
            continue
        try:
            kv = parse_kv(srv.log_path.read_text(errors="replace"))
            pl = plans.get(tag) or {}
            pred = dict(pl.get("kv") or {})
            if not pred.get("kv_tokens"):
                pred = predict_kv(model_dir, gpu_bytes=gpu_bytes, util=a.gpu_memory_utilization, max_loras=max_loras,
                                  rank=a.rank, max_num_seqs=a.max_num_seqs,
                                  max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len)
                pred["planner_error"] = pl.get("error")
            err = None
            if kv.get("kv_tokens") and pred.get("kv_tokens"):
                err = (pred["kv_tokens"] - kv["kv_tokens"]) / kv["kv_tokens"]
            result["servers"][tag] = {"argv": srv.argv(), "ready_s": srv.ready_s, "vllm_kv": kv,
                                      "planner_kv": pred, "kv_prediction_error": err}
            log(f"[{tag}] ready in {srv.ready_s:.0f} s; vLLM KV {kv}; planner {pred.get('kv_tokens')} tokens"
                + (f" ({err * 100:+.1f}%)" if err is not None else f" {pred.get('error', '')}"))
            save()
            for name, stag, adapt in setups:
                if stag != tag:
                    continue
                if time.time() - t_begin > a.deadline_s - 20:
                    log(f"skipping {name}: deadline")
                    result["setups"].append({"setup": name, "server": tag, "skipped": "deadline"})
                    continue
                run_workload_sync(srv.url, build_workload(wl(adapt, a.warmup_requests, 1000)))
                sums = []
                for i in range(a.runs):
                    w = build_workload(wl(adapt, a.num_requests, i))  # run i: seed i (no prefix-cache replay)
                    rr = run_workload_sync(srv.url, w)
                    s = report.summarize(rr, w)
                    sums.append(s)
                    o = s["overall"]
                    log(f"  {name} run {i + 1}: {o['output_tok_s']:.0f} out tok/s, TTFT p50 "
                        f"{(o['ttft_s']['p50'] or 0) * 1000:.0f} ms, TPOT p50 {(o['tpot_s']['p50'] or 0) * 1000:.1f} ms, "
                        f"errors {o['errors']}")
                med = report.median_summary(sums)
                mo = med["overall"]
                row = {"setup": name, "server": tag, "max_loras": max_loras, "adapters": list(adapt),
                       "output_tok_s": mo["output_tok_s"], "req_s": mo["req_s"],
                       "runs_tok_s": [x["overall"]["output_tok_s"] for x in sums],
                       "ttft_p50": mo["ttft_s"]["p50"], "ttft_p99": mo["ttft_s"]["p99"],
                       "tpot_p50": mo["tpot_s"]["p50"], "tpot_p99": mo["tpot_s"]["p99"],
                       "e2e_p50": mo["e2e_s"]["p50"], "e2e_p99": mo["e2e_s"]["p99"],
                       "errors": med["errors_total"], "input_tokens_per_req":
                           (mo.get("input_tokens") or 0) / max(1, mo.get("ok") or 1),
                       "median": med, "run_summaries": sums}
                if tag == "nolora":
                    ref_tok_s = row["output_tok_s"]
                row["ratio"] = row["output_tok_s"] / ref_tok_s if ref_tok_s and row["output_tok_s"] else None
                result["setups"].append(row)
                save()
        finally:
            srv.stop()
            log(f"[{tag}] stopped")

    rows = [r for r in result["setups"] if "output_tok_s" in r]
    from peftdeploy.bench.compare import ratio_rows

    head, trows = ratio_rows(rows)
    md = [f"GPU: {result['gpu']}; vLLM {result['vllm']}; Llama-3-8B-shaped, dummy weights, bf16; "
          f"{a.n_loras} random rank-{a.rank} all-linear adapters; closed loop {a.concurrency} concurrent, "
          f"{a.input_len}-word prompts, {a.output_len} output tokens; median of {a.runs} runs after warm-up; "
          f"{'eager' if a.eager else 'CUDA graphs'}", "", report.format_table(head, trows), ""]
    zipf_row = next((r for r in rows if r["server"] == "lora8" and len(r["adapters"]) > 1), None)
    if zipf_row and zipf_row.get("ratio"):
        result["ratio_unmerged_zipf_vs_merged"] = zipf_row["ratio"]
        md.append(f"unmerged ({a.n_loras} adapters, Zipf {a.zipf:g}) / merged throughput = {zipf_row['ratio']:.2f}")
    md.append("")
    md.append("| server | vLLM KV tokens | planner predicted | error |")
    md.append("|---|---|---|---|")
    for tag, s in result["servers"].items():
        vk = (s.get("vllm_kv") or {}).get("kv_tokens")
        pk = (s.get("planner_kv") or {}).get("kv_tokens")
        e = s.get("kv_prediction_error")
        md.append(f"| {tag} | {vk if vk is not None else '-'} | {pk if pk is not None else (s.get('planner_kv') or {}).get('error', '-')} | "
                  f"{f'{e * 100:+.1f}%' if e is not None else '-'} |")
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["total_s"] = time.time() - t_begin
    save()
    (out / "gpu_bench.md").write_text("\n".join(md) + "\n")
    report.plot_compare(rows, out / "gpu_bench.png", title="8B-shaped, H200: merged vs multi-LoRA (vLLM 0.26)")
    print("\n".join(md))
    log(f"total {time.time() - t_begin:.0f} s")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
