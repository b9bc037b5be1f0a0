"""Derive the `auto` serving fields and the memory budget; every value carries its reason.

Rules (all numbers per GPU / TP rank):
* max_lora_rank: the largest rank of any served adapter (rank_pattern included), rounded up to a rank
  vLLM accepts. No declared adapters: 16 (vLLM's default) for adapters loaded on first request.
* max_loras: the distinct adapters one batch needs — the 99th percentile of distinct adapters among
  max_num_seqs requests under the traffic shares (policy.traffic, or observed; uniform over the served
  adapters when none is given; plan/slots.py), at most the number of served adapters — bounded so the
  LoRA slots take at most `LORA_SHARE` (25%) of the memory left for KV cache + LoRA slots; at least 1.
  When the bound binds, finding `lora-slots-short` says by how much and what would fix it; an explicit
  max_loras below the traffic's need is finding `max-loras-below-traffic`. max_num_seqs itself follows
  from the KV cache the slots leave, so the sizing runs for the largest batch first and once more for
  the max_num_seqs that results when that is smaller.
* max_cpu_loras: all declared adapters when their bytes (in the LoRA dtype) fit in `HOST_LORA_SHARE`
  (10%) of host RAM, else as many as fit; never below max_loras. An explicit max_cpu_loras below the
  served adapters is finding `cpu-loras-churn` (a warning when more than 1% of requests go to adapters
  outside the max_cpu_loras most requested ones).
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
from typing import TYPE_CHECKING, Any

from ..errors import Finding, Severity
from ..inventory import AdapterInfo, Inventory
from ..quantize.cpu_isa import AMX_INT8_KERNEL
from . import memory as M
from . import slots as S

if TYPE_CHECKING:  # pragma: no cover
    from ..quantize.cpu_isa import CpuIsa
    from ..recipe.schema import Recipe

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


def derive(recipe: Recipe, inventory: Inventory, *, device: str, served: list[AdapterInfo], lora_enabled: bool,
           gpu_memory: int | None = None, host_memory: int | None = None,
           loc: Any = lambda *p: None, slot_shares: dict[str, float] | None = None,
           traffic_source: str | None = "policy.traffic", host_isa: CpuIsa | None = None,
           ) -> tuple[dict[str, Derived], M.MemoryBudget | None, list[Finding]]:
    """`slot_shares`: per served adapter name, its share of all requests (None: uniform over the served
    adapters); `traffic_source` names where the shares came from in findings and reasons (None: none given);
    `host_isa`: the CPU a local CPU plan runs on (None: not known, e.g. a render for another host)."""
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
    why = f"auto: the checkpoint's dtype ({model.torch_dtype or model.weight_dtype})"
    takes = host_isa.activation_dtypes(recipe.quantization.scheme) if host_isa is not None else None
    if recipe.backbone.dtype == "auto" and takes and dtype not in takes:
        dtype, why = takes[0], (f"auto: {recipe.quantization.scheme} on this AMX CPU runs vLLM's "
                                f"{AMX_INT8_KERNEL}, which takes {' / '.join(takes)} activations (the "
                                f"checkpoint is {dtype}; the merge stays full precision)")
    out["dtype"] = Derived("dtype", dtype, "set in the recipe" if recipe.backbone.dtype != "auto" else why,
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

    # -- max_loras, max_cpu_loras, KV cache, max_num_seqs ------------------------------------------
    # max_loras is sized for a batch of max_num_seqs requests, and max_num_seqs follows from the KV cache
    # the slots leave: size once for the largest batch the engine may form (the recipe's max_num_seqs, else
    # the device's cap), and once more for the max_num_seqs that came out when that is smaller.
    seq_cap = 256 if device == "cuda" else 128
    shares = {a.name: float((slot_shares or {}).get(a.name, 0.0)) for a in served}
    if slot_shares is None and served:  # nothing told: every served adapter equally likely
        shares = {a.name: 1.0 / len(served) for a in served}

    def size(batch: int) -> dict[str, Any]:
        return _size(recipe, inventory, device=device, served=served, lora_enabled=lora_enabled, batch=batch,
                     shares=shares, traffic_source=traffic_source, pool=pool, per_lora=per_lora, rank=rank,
                     per_token=per_token, max_len=max_len, host=host, wbytes=wbytes, elt=elt, tp=tp,
                     seq_cap=seq_cap, loc=loc)

    batch = s.max_num_seqs if isinstance(s.max_num_seqs, int) else seq_cap
    sized = size(batch)
    if lora_enabled and not isinstance(s.max_num_seqs, int) and sized["max_num_seqs"] < batch:
        sized = size(sized["max_num_seqs"])
    out.update(sized["out"])
    findings += sized["findings"]
    slot_bytes, breakdown, cpu_lora_bytes = sized["slot_bytes"], sized["breakdown"], sized["cpu_lora_bytes"]
    kv_bytes, kv_tokens, concurrency = sized["kv_bytes"], sized["kv_tokens"], sized["concurrency"]

    budget = M.MemoryBudget(
        device=device, device_memory=total, device_memory_source=total_src, host_memory=host,
        gpu_memory_utilization=util, dtype=dtype, lora_dtype_bytes=elt, kv_dtype="fp8" if kv_fp8 else dtype,
        weight_bytes=wbytes, weight_note=wnote, weights_estimated=model.weights_estimated,
        lora_slot_bytes=slot_bytes, lora_slot_breakdown=breakdown, overhead_bytes=overhead,
        kv_cache_bytes=kv_bytes, kv_bytes_per_token=per_token, kv_tokens=int(kv_tokens), max_model_len=max_len,
        max_concurrency=round(concurrency, 2), cpu_lora_bytes=cpu_lora_bytes, notes=tuple(notes),
    )
    return out, budget, findings


def _size(recipe: Recipe, inventory: Inventory, *, device: str, served: list[AdapterInfo], lora_enabled: bool,
          batch: int, shares: dict[str, float], traffic_source: str | None, pool: int | None, per_lora: int, rank: int,
          per_token: int, max_len: int, host: int, wbytes: int, elt: int, tp: int, seq_cap: int,
          loc: Any) -> dict[str, Any]:
    """max_loras (for a batch of `batch` requests), max_cpu_loras, the KV cache and max_num_seqs."""
    s = recipe.serving
    model = inventory.model
    out: dict[str, Derived] = {}
    findings: list[Finding] = []

    # -- max_loras -----------------------------------------------------------------------------
    n_served = len(served)
    bs = S.distinct_adapters(list(shares.values()), batch) if served else None
    traffic = S.describe_shares(shares, traffic_source) if served else ""
    if lora_enabled:
        if isinstance(s.max_loras, int):
            max_loras = s.max_loras
            out["max_loras"] = Derived("max_loras", max_loras, "set in the recipe", "recipe")
            if bs is not None and bs.p99 > max_loras:
                findings.append(Finding(
                    "max-loras-below-traffic", Severity.WARNING,
                    f"serving.max_loras {max_loras}: {traffic} puts ~{bs.mean:.1f} distinct adapters (p99 {bs.p99}) "
                    f"in a batch of {batch} requests; with {max_loras} LoRA slots requests wait for a slot and "
                    "slots are swapped (TTFT spikes, lower throughput)",
                    fix=f"leave max_loras: auto (plan sizes it for the traffic), or set it to {bs.p99}",
                    subject="serving", location=loc("serving", "max_loras"),
                    data={"batch": batch, "distinct_mean": round(bs.mean, 2), "distinct_p99": bs.p99}))
        else:
            need = max(1, min(n_served, bs.p99)) if bs is not None else 1
            ref = pool if pool is not None else None
            if ref is None:  # CPU: bound against the KV space a CPU deployment would get
                ref = _cpu_kv_space(per_token, max_len, s, host, wbytes, 0) * M.GiB + need * per_lora
            cap = max(1, int(LORA_SHARE * max(ref, 0) // per_lora)) if per_lora else need
            max_loras = max(1, min(need, cap))
            if bs is None:
                why = "no declared adapters: 1 slot for dynamic ones"
            else:
                why = (f"{n_served} served adapter(s); {traffic} puts ~{bs.mean:.1f} distinct adapters (p99 "
                       f"{bs.p99}) in a batch of {batch} requests (max_num_seqs)")
                if bs.p99 >= n_served:
                    why += f": all {n_served}"
                elif need == bs.p99:
                    why += f": {need} slot(s)"
                else:
                    why += f": {need} slot (at least one)"
            if max_loras < need:
                why += (f", bounded to {max_loras} so LoRA slots ({M.gib(per_lora)} each) take at most "
                        f"{LORA_SHARE:.0%} of the KV+LoRA budget ({M.gib(ref)})")
                if bs is not None:
                    findings.append(_slots_short(recipe, device, n_served, bs, traffic, need, max_loras, per_lora,
                                                 ref, list(shares.values()), loc))
            else:
                why += (f"; {max_loras} × {M.gib(per_lora)} = {M.gib(per_lora * max_loras)}, within "
                        f"{LORA_SHARE:.0%} of the KV+LoRA budget")
            out["max_loras"] = Derived("max_loras", max_loras, why, "auto")
    else:
        max_loras = 0
    slot_bytes = per_lora * max_loras
    breakdown = (M.lora_slot_breakdown(model, max_loras=max_loras, max_lora_rank=rank, dtype_bytes=elt, tp=tp)
                 if lora_enabled else {})

    # -- max_cpu_loras ---------------------------------------------------------------------------
    cpu_lora_bytes = 0
    if lora_enabled:
        def in_lora_dtype(a: AdapterInfo) -> int:
            src = {"F32": 4, "F16": 2, "BF16": 2}.get(a.dtype or "", elt)
            return int(a.bytes * elt / src)

        if isinstance(s.max_cpu_loras, int):
            mcl = s.max_cpu_loras
            out["max_cpu_loras"] = Derived("max_cpu_loras", mcl, "set in the recipe", "recipe")
            if served and mcl < len(served):
                ranked = sorted(shares.values(), reverse=True)
                beyond = sum(ranked[mcl:])
                msg = (f"max_cpu_loras {mcl} < {len(served)} served adapters: vLLM will evict and reload adapters "
                       "from disk (LRU)")
                if beyond > 0:
                    msg += (f"; by {traffic}, {beyond:.0%} of requests go to adapters outside the {mcl} most "
                            "requested ones, so at least that share can miss the CPU cache")
                findings.append(Finding("cpu-loras-churn", Severity.WARNING if beyond > 0.01 else Severity.INFO,
                                        msg, fix="raise max_cpu_loras or leave it auto (every served adapter "
                                        "when they fit in host RAM)", subject="serving",
                                        location=loc("serving", "max_cpu_loras")))
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
    if isinstance(s.max_num_seqs, int):
        mns = s.max_num_seqs
        out["max_num_seqs"] = Derived("max_num_seqs", mns, "set in the recipe", "recipe")
    else:
        mns = _round8(min(seq_cap, max(1, int(4 * kv_tokens // max(max_len, 1)))))
        out["max_num_seqs"] = Derived(
            "max_num_seqs", mns, f"4 × KV tokens ({kv_tokens:,}) / max_model_len ({max_len:,}) — requests average "
            f"a quarter of max_model_len — capped at {seq_cap}, rounded down to a multiple of 8", "auto")
    return {"out": out, "findings": findings, "slot_bytes": slot_bytes, "breakdown": breakdown,
            "cpu_lora_bytes": cpu_lora_bytes, "kv_bytes": kv_bytes, "kv_tokens": kv_tokens,
            "concurrency": concurrency, "max_num_seqs": mns}


def _slots_short(recipe: Recipe, device: str, n_served: int, bs: S.BatchSlots, traffic: str, need: int, slots: int,
                 per_lora: int, ref: int, shares: list[float], loc: Any) -> Finding:
    """The finding for a LoRA slot count the memory bound keeps below what the traffic needs."""
    s = recipe.serving
    fits = S.largest_batch_within(shares, slots, bs.batch)
    fixes = [f"set serving.max_loras: {need} to take {M.gib((need - slots) * per_lora)} more from the KV cache"]
    if fits >= 1:
        fixes.append(f"set serving.max_num_seqs: {fits} (a batch that size holds at most {slots} distinct adapters "
                     "at p99; fewer requests run at once)")
    if device == "cuda":
        fixes.append(f"use a larger GPU, or tensor_parallel_size {s.tensor_parallel_size * 2} (the weights split "
                     "across GPUs leave room for more slots)")
    fixes.append("split the adapters over several deployments")
    return Finding(
        "lora-slots-short", Severity.WARNING,
        f"{n_served} adapters: {traffic} puts ~{bs.mean:.1f} distinct adapters (p99 {bs.p99}) in a {bs.batch}-request "
        f"batch; only {slots} LoRA slot(s) of {M.gib(per_lora)} fit in {LORA_SHARE:.0%} of the {M.gib(ref)} "
        f"KV+LoRA budget: expect slot swaps and requests waiting for a slot (TTFT spikes)",
        fix="; or ".join(fixes), subject="serving",
        location=loc("serving", "max_loras") or loc("policy", "traffic") or loc("adapters"),
        data={"batch": bs.batch, "distinct_mean": round(bs.mean, 2), "distinct_p99": bs.p99, "slots": slots,
              "slot_bytes": per_lora, "budget_bytes": ref, "max_num_seqs_that_fits": fits})


def _cpu_kv_space(per_token: int, max_len: int, s: Any, host: int, wbytes: int, lora_bytes: int) -> int:
    seqs = s.max_num_seqs if isinstance(s.max_num_seqs, int) else CPU_KV_SEQS
    need = per_token * max_len * seqs
    gib_need = max(1, math.ceil(need / M.GiB))
    room = int(host * CPU_RAM_SHARE) - wbytes - lora_bytes
    gib_room = max(1, room // M.GiB)
    return int(min(gib_need, gib_room))


__all__ = ["Derived", "derive", "LORA_SHARE", "HOST_LORA_SHARE"]
