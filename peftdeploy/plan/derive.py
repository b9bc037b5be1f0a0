"""Derive the `auto` serving fields and the memory budget; every value carries its reason.

Rules (all numbers per GPU / TP rank):
* max_lora_rank: the largest rank of any served adapter (rank_pattern included), rounded up to a rank
  vLLM accepts. No declared adapters: 16 (vLLM's default) for adapters loaded on first request.
* max_loras: the number of served adapters, bounded so the LoRA slots take at most
  `LORA_SHARE` (25%) of the memory left for KV cache + LoRA slots; at least 1.
* max_cpu_loras: all declared adapters when their bytes (in the LoRA dtype) fit in `HOST_LORA_SHARE`
  (10%) of host RAM, else as many as fit; never below max_loras.
* max_num_seqs: enough sequences to fill the KV cache when the average request uses a quarter of
  max_model_len (4 × KV tokens / max_model_len), capped at vLLM's defaults (256 GPU, 128 CPU), rounded
  down to a multiple of 8 when >= 8.
* CPU KV space (VLLM_CPU_KVCACHE_SPACE, whole GiB): room for `CPU_KV_SEQS` (or max_num_seqs when set)
  sequences of max_model_len, at least 1 GiB, at most what host RAM leaves after weights and LoRA
  (`CPU_RAM_SHARE` of host RAM in total).
* GPU KV budget: gpu_memory × gpu_memory_utilization − weights − LoRA slots − an ESTIMATE of
  activations / CUDA graphs (vLLM measures these by profiling at start).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import Finding, Severity
from ..inspect import AdapterInfo, Inventory
from . import memory as M

LORA_SHARE = 0.25
HOST_LORA_SHARE = 0.10
CPU_RAM_SHARE = 0.60
CPU_KV_SEQS = 4
DEFAULT_GPU_MEMORY = 80 * M.GiB
GPU_BATCHED_TOKENS = 8192
CPU_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class Derived:
    name: str
    value: Any
    reason: str
    source: str  # "auto" | "recipe" | "default"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason, "source": self.source}


def _round8(n: int) -> int:
    return n - n % 8 if n >= 8 else max(1, n)


def derive(recipe: Any, inventory: Inventory, *, device: str, served: list[AdapterInfo], lora_enabled: bool,
           gpu_memory: int | None = None, host_memory: int | None = None,
           loc: Any = lambda *p: None) -> tuple[dict[str, Derived], M.MemoryBudget | None, list[Finding]]:
    s = recipe.serving
    out: dict[str, Derived] = {}
    findings: list[Finding] = []
    model = inventory.model

    # -- max_lora_rank ---------------------------------------------------------------------
    if lora_enabled:
        if isinstance(s.max_lora_rank, int):
            out["max_lora_rank"] = Derived("max_lora_rank", s.max_lora_rank, "set in the recipe", "recipe")
            if s.max_lora_rank not in M.accepted_ranks():
                r2 = M.round_rank(s.max_lora_rank)
                findings.append(Finding("max-lora-rank-invalid", Severity.ERROR,
                                        f"serving.max_lora_rank {s.max_lora_rank} is not a rank vLLM accepts "
                                        f"({', '.join(map(str, M.accepted_ranks()))})",
                                        fix=f"use {r2 or 512} or auto", subject="serving",
                                        location=loc("serving", "max_lora_rank")))
        elif served:
            top = max(served, key=lambda a: a.max_rank)
            r = M.round_rank(top.max_rank) or M.accepted_ranks()[-1]
            why = f"largest adapter rank is {top.max_rank} ({top.name})"
            why += f", rounded up to {r}, the next rank vLLM accepts" if r != top.max_rank else ", a rank vLLM accepts"
            out["max_lora_rank"] = Derived("max_lora_rank", r, why, "auto")
        else:
            out["max_lora_rank"] = Derived("max_lora_rank", 16, "no declared adapters; vLLM's default 16 for "
                                           "adapters loaded on first request", "auto")
    if model is None:
        if lora_enabled:
            n = max(1, len(served))
            out["max_loras"] = Derived("max_loras", s.max_loras if isinstance(s.max_loras, int) else n,
                                       "backbone not inspected: number of adapters", "recipe"
                                       if isinstance(s.max_loras, int) else "auto")
        return out, None, findings

    tp = s.tensor_parallel_size
    dtype = M.model_dtype(model, recipe.backbone.dtype)
    out["dtype"] = Derived("dtype", dtype, "set in the recipe" if recipe.backbone.dtype != "auto" else
                           f"auto: the checkpoint's dtype ({model.torch_dtype or model.weight_dtype})",
                           "recipe" if recipe.backbone.dtype != "auto" else "auto")
    elt = M.DTYPE_BYTES[dtype]
    kv_fp8 = recipe.quantization.kv_cache_dtype == "fp8"
    kv_elt = 1 if kv_fp8 else elt
    per_token = M.kv_bytes_per_token(model, kv_dtype_bytes=kv_elt, tp=tp)
    if recipe.backbone.max_model_len:
        max_len = recipe.backbone.max_model_len
        out["max_model_len"] = Derived("max_model_len", max_len, "set in the recipe", "recipe")
    else:
        max_len = int(model.max_position_embeddings or 4096)
        out["max_model_len"] = Derived("max_model_len", max_len, "the model's max_position_embeddings", "default")
    wbytes, wnote = M.weight_bytes(model, scheme=recipe.quantization.scheme, dtype=dtype)
    wbytes = wbytes // tp
    rank = out["max_lora_rank"].value if lora_enabled else 0
    per_lora = M.lora_slot_bytes(model, max_loras=1, max_lora_rank=rank, dtype_bytes=elt, tp=tp) if lora_enabled else 0
    host = host_memory or M.detect_host_memory()
    notes: list[str] = []
    if model.weights_estimated:
        notes.append("weight bytes are ESTIMATED from config.json (weights not available locally)")

    # -- the pool shared by KV cache and LoRA slots ---------------------------------------------
    if device == "cuda":
        if gpu_memory:
            total, total_src = gpu_memory, "--gpu-memory"
        else:
            det = M.detect_gpu_memory()
            total, total_src = (det, "nvidia-smi") if det else (DEFAULT_GPU_MEMORY, "assumed (pass --gpu-memory)")
        util = s.gpu_memory_utilization
        seqs_for_overhead = s.max_num_seqs if isinstance(s.max_num_seqs, int) else 256
        overhead = M.gpu_overhead_bytes(model, max_num_batched_tokens=GPU_BATCHED_TOKENS,
                                        max_num_seqs=seqs_for_overhead, dtype_bytes=elt, tp=tp)
        pool = int(total * util) - wbytes - overhead
        notes.append("activation / CUDA-graph overhead is an ESTIMATE; vLLM profiles it at start")
        if pool <= 0:
            findings.append(Finding("weights-exceed-gpu", Severity.ERROR,
                                    f"the weights ({M.gib(wbytes)}) and runtime overhead (~{M.gib(overhead)}) do not "
                                    f"fit in {M.gib(total)} × gpu_memory_utilization {util}",
                                    fix="use a larger GPU, tensor_parallel_size > 1, or a quantization scheme "
                                        "(fp8 halves bf16 weights)", subject="serving",
                                    location=loc("serving", "gpu_memory_utilization")))
    else:
        total, total_src, util, overhead = None, "host", None, 0
        pool = None  # decided below from the KV need

    # -- max_loras -----------------------------------------------------------------------------
    n_served = len(served)
    if lora_enabled:
        if isinstance(s.max_loras, int):
            max_loras = s.max_loras
            out["max_loras"] = Derived("max_loras", max_loras, "set in the recipe", "recipe")
        else:
            want = max(1, n_served)
            ref = pool if pool is not None else None
            if ref is None:  # CPU: bound against the KV space a CPU deployment would get
                ref = _cpu_kv_space(per_token, max_len, s, host, wbytes, 0) * M.GiB + want * per_lora
            cap = max(1, int(LORA_SHARE * max(ref, 0) // per_lora)) if per_lora else want
            max_loras = max(1, min(want, cap))
            why = (f"{n_served} served adapter(s)" if n_served else "no declared adapters: 1 slot for dynamic ones")
            if max_loras < want:
                why += (f", bounded to {max_loras} so LoRA slots ({M.gib(per_lora)} each) take at most "
                        f"{LORA_SHARE:.0%} of the KV+LoRA budget ({M.gib(ref)})")
            else:
                why += (f"; {max_loras} slot(s) × {M.gib(per_lora)} = {M.gib(per_lora * max_loras)}, within "
                        f"{LORA_SHARE:.0%} of the KV+LoRA budget")
            out["max_loras"] = Derived("max_loras", max_loras, why, "auto")
    else:
        max_loras = 0
    slot_bytes = per_lora * max_loras
    breakdown = (M.lora_slot_breakdown(model, max_loras=max_loras, max_lora_rank=rank, dtype_bytes=elt, tp=tp)
                 if lora_enabled else {})

    # -- max_cpu_loras ---------------------------------------------------------------------------
    adapters_all = list(inventory.adapters)
    cpu_lora_bytes = 0
    if lora_enabled:
        def in_lora_dtype(a: AdapterInfo) -> int:
            src = {"F32": 4, "F16": 2, "BF16": 2}.get(a.dtype or "", elt)
            return int(a.bytes * elt / src)

        if isinstance(s.max_cpu_loras, int):
            mcl = s.max_cpu_loras
            out["max_cpu_loras"] = Derived("max_cpu_loras", mcl, "set in the recipe", "recipe")
            if served and mcl < len(served):
                findings.append(Finding("cpu-loras-churn", Severity.INFO,
                                        f"max_cpu_loras {mcl} < {len(served)} served adapters: vLLM will evict and "
                                        "reload adapters from disk (LRU)", fix="raise max_cpu_loras or leave it auto",
                                        subject="serving", location=loc("serving", "max_cpu_loras")))
        else:
            budget = int(host * HOST_LORA_SHARE)
            sizes = sorted(in_lora_dtype(a) for a in served)
            total_sz = sum(sizes)
            if total_sz <= budget:
                mcl = max(max_loras, len(served))
                why = (f"all {len(served)} adapters fit in host RAM ({M.gib(total_sz)} of a {M.gib(budget)} "
                       f"budget = {HOST_LORA_SHARE:.0%} of {M.gib(host)})")
            else:
                fit, acc = 0, 0
                for sz in sizes:
                    if acc + sz > budget:
                        break
                    acc += sz
                    fit += 1
                mcl = max(max_loras, fit)
                why = (f"only {fit} of {len(served)} adapters fit in {HOST_LORA_SHARE:.0%} of host RAM "
                       f"({M.gib(budget)}); the rest are reloaded on demand")
            if mcl == max_loras and len(served) < max_loras:
                why += f"; at least max_loras ({max_loras})"
            out["max_cpu_loras"] = Derived("max_cpu_loras", mcl, why, "auto")
        by_size = sorted((in_lora_dtype(a) for a in served), reverse=True)
        cpu_lora_bytes = sum(by_size[: out["max_cpu_loras"].value])

    # -- KV cache --------------------------------------------------------------------------------
    if device == "cuda":
        kv_bytes = max(0, (pool or 0) - slot_bytes)
    else:
        gib_kv = _cpu_kv_space(per_token, max_len, s, host, wbytes, slot_bytes + cpu_lora_bytes)
        kv_bytes = gib_kv * M.GiB
        seqs = s.max_num_seqs if isinstance(s.max_num_seqs, int) else CPU_KV_SEQS
        out["cpu_kvcache_space"] = Derived(
            "cpu_kvcache_space", gib_kv,
            f"VLLM_CPU_KVCACHE_SPACE (GiB): {seqs} sequence(s) × max_model_len {max_len} × {M.gib(per_token)}/token "
            f"= {M.gib(per_token * max_len * seqs)}, rounded up to whole GiB, at most what {CPU_RAM_SHARE:.0%} of "
            f"host RAM ({M.gib(host)}) leaves after weights and LoRA", "auto")
    kv_tokens = kv_bytes // per_token if per_token else 0
    concurrency = kv_tokens / max_len if max_len else 0.0
    if kv_tokens < max_len:
        findings.append(Finding("kv-cache-too-small", Severity.ERROR,
                                f"the KV cache holds {kv_tokens:,} tokens, less than one request of max_model_len "
                                f"{max_len:,}: vLLM would refuse to start",
                                fix="lower backbone.max_model_len, raise gpu_memory_utilization, lower max_loras / "
                                    "max_lora_rank, use kv_cache_dtype: fp8 or a larger GPU",
                                subject="serving", location=loc("backbone", "max_model_len")))
    if lora_enabled and isinstance(s.max_loras, int) and device == "cuda" and pool and pool > 0:
        if slot_bytes > LORA_SHARE * pool:
            findings.append(Finding("lora-slots-large", Severity.WARNING,
                                    f"max_loras {s.max_loras} × max_lora_rank {rank} LoRA slots take "
                                    f"{M.gib(slot_bytes)}, {slot_bytes / pool:.0%} of the KV+LoRA budget",
                                    fix="lower max_loras (or leave it auto) to keep KV cache for requests",
                                    subject="serving", location=loc("serving", "max_loras")))

    # -- max_num_seqs ------------------------------------------------------------------------------
    cap = 256 if device == "cuda" else 128
    if isinstance(s.max_num_seqs, int):
        out["max_num_seqs"] = Derived("max_num_seqs", s.max_num_seqs, "set in the recipe", "recipe")
    else:
        n = _round8(min(cap, max(1, int(4 * kv_tokens // max(max_len, 1)))))
        out["max_num_seqs"] = Derived(
            "max_num_seqs", n, f"4 × KV tokens ({kv_tokens:,}) / max_model_len ({max_len:,}) — requests average "
            f"a quarter of max_model_len — capped at {cap}, rounded down to a multiple of 8", "auto")

    budget = M.MemoryBudget(
        device=device, device_memory=total, device_memory_source=total_src, host_memory=host,
        gpu_memory_utilization=util, dtype=dtype, lora_dtype_bytes=elt, kv_dtype="fp8" if kv_fp8 else dtype,
        weight_bytes=wbytes, weight_note=wnote, weights_estimated=model.weights_estimated,
        lora_slot_bytes=slot_bytes, lora_slot_breakdown=breakdown, overhead_bytes=overhead,
        kv_cache_bytes=kv_bytes, kv_bytes_per_token=per_token, kv_tokens=int(kv_tokens), max_model_len=max_len,
        max_concurrency=round(concurrency, 2), cpu_lora_bytes=cpu_lora_bytes, notes=tuple(notes),
    )
    return out, budget, findings


def _cpu_kv_space(per_token: int, max_len: int, s: Any, host: int, wbytes: int, lora_bytes: int) -> int:
    seqs = s.max_num_seqs if isinstance(s.max_num_seqs, int) else CPU_KV_SEQS
    need = per_token * max_len * seqs
    gib_need = max(1, math.ceil(need / M.GiB))
    room = int(host * CPU_RAM_SHARE) - wbytes - lora_bytes
    gib_room = max(1, room // M.GiB)
    return int(min(gib_need, gib_room))


__all__ = ["Derived", "derive", "LORA_SHARE", "HOST_LORA_SHARE"]
