"""The byte model: backbone weights, LoRA slots, KV cache — as vLLM (0.32) allocates them.

No torch / vLLM imports. The LoRA slot model follows vllm/lora (model_manager._create_lora_modules,
layers/*.create_lora_weights):

* vLLM wraps *every* LoRA-capable module of the model — all `LinearBase` modules plus the names in the
  model class's `embedding_modules` — regardless of which modules the served adapters target
  (unless `--lora-target-modules` restricts them). Adapters only fill the buffers.
* For a linear layer with `n_slices` output slices (qkv_proj: 3 = q,k,v; gate_up_proj: 2) it
  allocates, per layer::

      lora_a_stacked[s]: (max_loras, 1, max_lora_rank, in)           for each slice s
      lora_b_stacked[s]: (max_loras, 1, out_s, max_lora_rank)         for each slice s

  i.e. max_loras × max_lora_rank × (n_slices × in + Σ out_s) elements of `lora_dtype`
  (= the model dtype unless --lora-dtype). Column-parallel layers shard `out` by TP, row-parallel
  layers (o_proj, down_proj) shard `in`.
* Models whose class lists `embed_tokens`/`lm_head` in `embedding_modules` (Llama, Qwen3, Granite, ...;
  *not* Mistral, Qwen2, Gemma) also get
  `VocabParallelEmbeddingWithLoRA` (A: max_loras × vocab × rank, B: max_loras × hidden × rank) and
  `LogitsProcessorWithLoRA` (A: max_loras × rank × hidden, B: max_loras × vocab × rank).

KV cache per token = layers × 2 (K and V) × kv_heads × head_dim × kv-dtype bytes (divided by TP
over kv heads, at least one head per rank).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..inventory import ModelInfo
from ..util import gib

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe.schema import Recipe

GiB = 1 << 30
MiB = 1 << 20

FALLBACK_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}


@lru_cache(maxsize=1)
def accepted_ranks() -> tuple[int, ...]:
    """vLLM's accepted max_lora_rank values, read from the installed vLLM's source (not imported)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("vllm")  # locates the package without importing it
        if spec and spec.submodule_search_locations:
            src = Path(next(iter(spec.submodule_search_locations))) / "config" / "lora.py"
            m = re.search(r"MaxLoRARanks\s*=\s*Literal\[([0-9,\s]+)\]", src.read_text())
            if m:
                return tuple(sorted(int(x) for x in m.group(1).replace(" ", "").split(",") if x))
    except Exception:  # noqa: BLE001 - fall back to the known set
        pass
    return FALLBACK_RANKS


def round_rank(r: int) -> int | None:
    """The smallest accepted rank >= r (None when r exceeds the largest)."""
    for a in accepted_ranks():
        if a >= r:
            return a
    return None


# --------------------------------------------------------------------------------------------
# What vLLM wraps, per architecture (from vllm/model_executor/models/*: packed_modules_mapping,
# embedding_modules). Architectures not listed are treated as Llama-like without embedding LoRA.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchLoRA:
    qkv_slices: int = 3  # packed q,k,v = 3 slices; Phi-3 packs them on disk = 1 slice
    gate_up_slices: int = 2
    embedding_lora: bool = False  # embed_tokens + lm_head in embedding_modules
    gated_mlp: bool = True
    supports_lora: bool = True


ARCH_LORA: dict[str, ArchLoRA] = {
    "LlamaForCausalLM": ArchLoRA(embedding_lora=True),
    "LLaMAForCausalLM": ArchLoRA(embedding_lora=True),
    "InternLM3ForCausalLM": ArchLoRA(embedding_lora=True),
    "MistralForCausalLM": ArchLoRA(embedding_lora=False),
    "Ministral3ForCausalLM": ArchLoRA(embedding_lora=False),
    "Qwen2ForCausalLM": ArchLoRA(embedding_lora=False),
    "Qwen3ForCausalLM": ArchLoRA(embedding_lora=True),
    "GemmaForCausalLM": ArchLoRA(embedding_lora=False),
    "Gemma2ForCausalLM": ArchLoRA(embedding_lora=False),
    "Phi3ForCausalLM": ArchLoRA(qkv_slices=1, gate_up_slices=1, embedding_lora=False),
    "GraniteForCausalLM": ArchLoRA(embedding_lora=True),
}

# HF module names LoRA can target on a dense decoder (after vLLM's packing), per architecture family.
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
EMBED_TARGETS = ("embed_tokens", "lm_head")


def arch_lora(model: ModelInfo) -> ArchLoRA:
    return ARCH_LORA.get(model.architecture, ArchLoRA())


def supported_targets(model: ModelInfo) -> tuple[str, ...]:
    a = arch_lora(model)
    base = PHI3_TARGETS if a.qkv_slices == 1 and model.architecture.startswith("Phi3") else LINEAR_TARGETS
    return base + (EMBED_TARGETS if a.embedding_lora else ())


@dataclass(frozen=True)
class SlotModule:
    name: str  # vLLM module name suffix (qkv_proj, o_proj, ..., embed_tokens, logits)
    count: int  # how many (layers)
    n_slices: int
    in_features: int  # per TP rank
    out_slices: tuple[int, ...]  # per TP rank

    def elements_per_lora_rank(self) -> int:
        """Elements per (lora slot × rank unit) for one instance: n_slices × in + Σ out."""
        return self.n_slices * self.in_features + sum(self.out_slices)


def lora_layout(model: ModelInfo, *, tp: int = 1) -> list[SlotModule]:
    a = arch_lora(model)
    h, i, L = model.hidden_size, model.intermediate_size, model.num_layers
    q = model.num_heads * model.head_dim // tp
    kv = max(1, model.num_kv_heads // tp) * model.head_dim
    mods = []
    if a.qkv_slices == 3:
        mods.append(SlotModule("qkv_proj", L, 3, h, (q, kv, kv)))
    else:
        mods.append(SlotModule("qkv_proj", L, 1, h, (q + 2 * kv,)))
    mods.append(SlotModule("o_proj", L, 1, model.num_heads * model.head_dim // tp, (h,)))
    if a.gated_mlp:
        if a.gate_up_slices == 2:
            mods.append(SlotModule("gate_up_proj", L, 2, h, (i // tp, i // tp)))
        else:
            mods.append(SlotModule("gate_up_proj", L, 1, h, (2 * i // tp,)))
    mods.append(SlotModule("down_proj", L, 1, i // tp, (h,)))
    if a.embedding_lora:
        # VocabParallelEmbeddingWithLoRA: A (max_loras, vocab, rank), B (max_loras, 1, hidden, rank)
        mods.append(SlotModule("embed_tokens", 1, 1, model.vocab_size, (h,)))
        # LogitsProcessorWithLoRA: A (max_loras, 1, rank, hidden), B (max_loras, 1, vocab, rank)
        mods.append(SlotModule("lm_head", 1, 1, h, (model.vocab_size,)))
    return mods


def lora_slot_bytes(model: ModelInfo, *, max_loras: int, max_lora_rank: int, dtype_bytes: int,
                    tp: int = 1) -> int:
    """Bytes vLLM preallocates (per GPU / TP rank) for LoRA slots: Σ lora_a_stacked + lora_b_stacked."""
    per = sum(m.count * m.elements_per_lora_rank() for m in lora_layout(model, tp=tp))
    return max_loras * max_lora_rank * dtype_bytes * per


def lora_slot_breakdown(model: ModelInfo, *, max_loras: int, max_lora_rank: int, dtype_bytes: int,
                        tp: int = 1) -> dict[str, int]:
    return {m.name: max_loras * max_lora_rank * dtype_bytes * m.count * m.elements_per_lora_rank()
            for m in lora_layout(model, tp=tp)}


def kv_bytes_per_token(model: ModelInfo, *, kv_dtype_bytes: int, tp: int = 1) -> int:
    kv_heads = max(1, model.num_kv_heads // tp)
    return model.num_layers * 2 * kv_heads * model.head_dim * kv_dtype_bytes


def model_dtype(model: ModelInfo, requested: str) -> str:
    """The dtype vLLM runs the model in for --dtype `requested` (auto: config's torch_dtype; fp32 -> fp32)."""
    if requested != "auto":
        return requested
    d = (model.torch_dtype or "").replace("torch.", "")
    if d in ("float16", "bfloat16", "float32"):
        return d
    if model.weight_dtype in ("F16",):
        return "float16"
    if model.weight_dtype in ("F32",):
        return "float32"
    return "bfloat16"


PREQUANTIZED_METHODS = ("awq", "gptq", "compressed-tensors", "fp8")
GROUP_CANDIDATES = (128, 64, 32)  # as peftdeploy.quantize.rtn.choose_group_size


def _prequantized(model: ModelInfo) -> bool:
    return model.quant_method in PREQUANTIZED_METHODS


def linear_dims(model: ModelInfo) -> list[tuple[int, int, int]]:
    """(in_features, out_features, count) of the decoder Linear weights (what a scheme quantizes).

    From the safetensors headers when the checkpoint is local and full precision; from config.json
    otherwise (Llama-like layout: q, k, v, o, gate, up, down per layer).
    """
    from ..inventory import _classify

    if model.tensors and not model.weights_estimated and not _prequantized(model):
        out: dict[tuple[int, int], int] = {}
        for name, (_dt, shape) in model.tensors.items():
            if _classify(name, shape) == "linear":
                key = (int(shape[1]), int(shape[0]))
                out[key] = out.get(key, 0) + 1
        if out:
            return [(i, o, n) for (i, o), n in sorted(out.items())]
    h, i, L = model.hidden_size, model.intermediate_size, model.num_layers
    q, kv = model.q_size, model.kv_size
    dims = [(h, q), (h, kv), (h, kv), (q, h)]
    dims += [(h, i), (h, i), (i, h)] if arch_lora(model).gated_mlp else [(h, i), (i, h)]
    return [(a, b, L) for a, b in dims]


def param_split(model: ModelInfo) -> tuple[int, int, str]:
    """(linear_params, other_params, where from): Linear weights a scheme quantizes vs the rest
    (embeddings, lm_head unless tied, norms, biases), which stay in the model dtype.

    Full-precision checkpoints: counted from the safetensors headers (inspect). Pre-quantized ones
    (packed int32 tensors) and remote ones: the parameter count config.json implies.
    """
    if _prequantized(model) and not model.weights_estimated:
        from ..inventory import model_info_from_config

        est = model_info_from_config(model.config, path=None, source=model.source)
        return est.linear_params, est.embed_params + est.lm_head_params + est.other_params, "config.json"
    src = "config.json (estimate)" if model.weights_estimated else "safetensors headers"
    return model.linear_params, model.embed_params + model.lm_head_params + model.other_params, src


def group_size_for(model: ModelInfo, requested: int) -> int | None:
    """The largest group size <= requested dividing every Linear input dimension (None: none does)."""
    ins = {d[0] for d in linear_dims(model)}
    for g in (requested,) + tuple(c for c in GROUP_CANDIDATES if c < requested):
        if all(x % g == 0 for x in ins):
            return g
    return None


def scheme_bytes_inputs(model: ModelInfo, scheme: str, dtype: str) -> dict[str, Any]:
    """The keyword arguments of :func:`peftdeploy.quantize.support.backbone_bytes` for this model.

    * per-channel scales: one per output row, so the exact overhead is Σ out_features × scale bytes;
      ``in_features`` is the effective one (linear params / Σ out rows) that gives exactly that.
    * group schemes: the group size peftdeploy's quantizer would choose (128, else 64 / 32).
    * offline schemes (int8 / w8a16 / w4a16): scales in the model dtype, as peftdeploy writes them.
    """
    from ..quantize.support import scheme_info

    info = scheme_info(scheme)
    lin, other, _src = param_split(model)
    dims = linear_dims(model)
    rows = sum(o * n for _i, o, n in dims)
    kw: dict[str, Any] = {"linear_params": int(lin), "other_params": int(other), "dtype_bytes": DTYPE_BYTES[dtype],
                          "in_features": (lin / rows) if rows else None, "group_size": None, "scale_bytes": None}
    if info.group_size:
        kw["group_size"] = group_size_for(model, info.group_size) or info.group_size
    if info.kind == "offline":
        kw["scale_bytes"] = DTYPE_BYTES[dtype]
    return kw


def weight_bytes(model: ModelInfo, *, scheme: str, dtype: str) -> tuple[int, str]:
    """Bytes of the backbone's weights as vLLM holds them, with a one-line explanation.

    Quantization schemes: :func:`peftdeploy.quantize.support.backbone_bytes` (the same model the
    scheme table and ``peftdeploy eval`` use). Pre-quantized checkpoints: bytes as stored.
    """
    from ..quantize.support import backbone_bytes, scheme_info

    elt = DTYPE_BYTES[dtype]
    if scheme in ("awq", "gptq") or _prequantized(model):
        return model.weight_bytes, "pre-quantized checkpoint: bytes as stored"
    info = scheme_info(scheme)
    if info.kind == "none":
        return int(model.total_params * elt), f"{dtype}: {elt} bytes per parameter"
    kw = scheme_bytes_inputs(model, scheme, dtype)
    b = backbone_bytes(scheme, **kw)
    if kw["group_size"]:
        how = f"{info.weight_bits:g}-bit + a {kw['scale_bytes'] or info.scale_bytes}-byte scale per {kw['group_size']}"
    else:
        how = f"{info.weight_bits:g}-bit + a {kw['scale_bytes'] or info.scale_bytes}-byte scale per output row"
    return b, f"{scheme}: linear weights {how}, rest {dtype}"


def gpu_overhead_bytes(model: ModelInfo, *, max_num_batched_tokens: int, max_num_seqs: int, dtype_bytes: int,
                       tp: int = 1) -> int:
    """ESTIMATE of activation peak + CUDA graphs + non-torch memory (vLLM measures it by profiling)."""
    h, i = model.hidden_size, model.intermediate_size // tp
    act = max_num_batched_tokens * (6 * h + 3 * i + (model.q_size + 2 * model.kv_size) // tp) * dtype_bytes
    logits = max_num_seqs * model.vocab_size * 4 * 2
    return int(act + logits + 768 * MiB)


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
def parse_bytes(s: str | int | float | None) -> int | None:
    """'80GiB', '80G' (binary), '80GB' (decimal), '512MiB', 1e9 -> bytes."""
    if s is None:
        return None
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", s, re.I)
    if not m:
        raise ValueError(f"cannot read a size from {s!r}; write e.g. 80GiB, 24GB or 512MiB")
    num, unit, bi, b = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    base = 1000 if (b and not bi) else 1024
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * base ** power)


def detect_device() -> str:
    """cuda when an NVIDIA GPU is visible (driver present), else cpu. Never imports torch."""
    if os.environ.get("PEFTDEPLOY_DEVICE") in ("cuda", "cpu"):
        return os.environ["PEFTDEPLOY_DEVICE"]
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return "cuda"
    return "cpu"


def detect_gpu_memory() -> int | None:
    """Total memory of GPU 0 via nvidia-smi (None when unavailable)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return int(float(out.strip().splitlines()[0])) * MiB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def detect_host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        return 16 * GiB


@dataclass(frozen=True)
class MemoryBudget:
    device: str  # "cuda" | "cpu"
    device_memory: int | None  # GPU total bytes (cuda); None on cpu
    device_memory_source: str  # "--gpu-memory", "nvidia-smi", "assumed", "host"
    host_memory: int
    gpu_memory_utilization: float | None
    dtype: str
    lora_dtype_bytes: int
    kv_dtype: str
    weight_bytes: int
    weight_note: str
    weights_estimated: bool
    lora_slot_bytes: int
    lora_slot_breakdown: dict[str, int]
    overhead_bytes: int  # activation/graphs estimate (GPU); 0 on CPU
    kv_cache_bytes: int  # what remains (GPU) or VLLM_CPU_KVCACHE_SPACE (CPU)
    kv_bytes_per_token: int
    kv_tokens: int  # capacity in tokens
    max_model_len: int
    max_concurrency: float  # kv_tokens / max_model_len
    cpu_lora_bytes: int  # host RAM for max_cpu_loras adapters
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    schemes: tuple["SchemeRow", ...] = ()  # the scheme table (scheme_table); set by make_plan

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"} | {
            "notes": list(self.notes), "schemes": [r.to_dict() for r in self.schemes]}


# --------------------------------------------------------------------------------------------
# the scheme table: every quantization scheme the backbone could use on the device
# --------------------------------------------------------------------------------------------
TABLE_SCHEMES = ("none", "fp8", "int8", "w8a16", "w4a16", "bitsandbytes")


@dataclass(frozen=True)
class SchemeRow:
    scheme: str
    chosen: bool  # the recipe's quantization.scheme
    kind: str  # none | runtime | offline | prequantized
    dtype: str  # activation / model dtype the scheme runs in on this device
    weight_bytes: int  # per GPU (TP rank) / host
    weight_delta: int  # vs the chosen scheme (negative: smaller)
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    kv_tokens_delta: int  # vs the chosen scheme
    max_concurrency: float  # kv_tokens / max_model_len
    lora_ok: bool  # vLLM serves unmerged LoRA adapters on a backbone with this scheme
    lora_note: str
    how: str  # how the weights get quantized (vLLM at load time, offline step, as stored)
    quantize_step: bool  # needs peftdeploy's offline quantize step (merge mode)
    usable: bool  # can this recipe use it as is (mode, dtype, device)
    note: str
    inputs: dict[str, Any] = field(default_factory=dict)  # backbone_bytes() keyword arguments

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def scheme_table(model: ModelInfo, budget: MemoryBudget, *, recipe: Recipe, device: str, mode: str,
                 local: bool = False) -> tuple[SchemeRow, ...]:
    """Backbone bytes and KV capacity for each scheme vLLM runs on `device`, next to the chosen one.

    Everything but the weights is held fixed: the same GPU memory × gpu_memory_utilization, LoRA
    slots and activation estimate (GPU), or the same VLLM_CPU_KVCACHE_SPACE rule (CPU: the KV space
    is sized by need, capped by what host RAM leaves after the weights, so smaller weights only
    help when that cap binds). On GPU the bytes a scheme frees all go to KV cache blocks::

        kv_tokens(s) = (gpu_memory × util − weights(s) − activations − LoRA slots) // KV bytes per token
    """
    from ..quantize.support import backbone_bytes, scheme_info
    from .derive import _cpu_kv_space

    chosen = scheme_info(recipe.quantization.scheme).name
    tp = max(1, recipe.serving.tensor_parallel_size)
    names = list(TABLE_SCHEMES)
    if chosen not in names:
        names.append(chosen)
    kv_fp8 = recipe.quantization.kv_cache_dtype == "fp8"
    raw: list[dict[str, Any]] = []
    for name in names:
        info = scheme_info(name)
        # local: this machine's CPU kernel build counts (cpu_isa: no 4-bit kernel on AVX2 hosts)
        ok_dev, why_dev = info.runs_on_this_host(device) if local else info.supported_on(device)
        if not ok_dev and name != chosen:
            continue  # only what vLLM runs on this device (the chosen one is always shown)
        dtype, notes = budget.dtype, []
        if device == "cpu" and info.kind != "none" and dtype not in info.cpu_dtypes and info.cpu_dtypes:
            dtype = info.cpu_dtypes[0]
            notes.append(f"runs in {dtype} on CPU (its kernel has no {budget.dtype} path): KV bytes per token "
                         f"change with it")
        if name == chosen:
            w = budget.weight_bytes * tp  # what derive used (per rank × tp)
            kw: dict[str, Any] = {}
            if info.kind != "prequantized" and not _prequantized(model):
                kw = scheme_bytes_inputs(model, name, dtype)
        elif info.kind == "prequantized":
            continue
        else:
            kw = scheme_bytes_inputs(model, name, dtype)
            w = backbone_bytes(name, **kw)
            if _prequantized(model):
                notes.append("needs the full-precision checkpoint (backbone.merge_base / a non-quantized backbone)")
        w //= tp
        per_token = kv_bytes_per_token(model, kv_dtype_bytes=1 if kv_fp8 else DTYPE_BYTES[dtype], tp=tp)
        if device == "cuda":
            total = int((budget.device_memory or 0) * (budget.gpu_memory_utilization or 0))
            kv = max(0, total - w - budget.overhead_bytes - budget.lora_slot_bytes)
        else:
            gib_kv = _cpu_kv_space(per_token, budget.max_model_len, recipe.serving, budget.host_memory, w,
                                   budget.lora_slot_bytes + budget.cpu_lora_bytes)
            kv = gib_kv * GiB
        if name == chosen:
            kv, per_token = budget.kv_cache_bytes, budget.kv_bytes_per_token  # exactly the plan's numbers
        tokens = kv // per_token if per_token else 0
        lora_ok, lora_note = info.lora_ok(device)
        quantize_step = info.kind == "offline"
        usable = ok_dev
        if info.kind == "none":
            how = "-"
        elif info.kind == "runtime":
            how = f"vLLM at load time (--quantization {info.vllm_quantization})"
        elif info.kind == "offline":
            if mode in ("merge", "hybrid"):
                how = "peftdeploy quantize step after the merge (compressed-tensors)"
            else:
                how = "offline quantize step: merge mode only"
                usable = False
        else:
            how = "checkpoint as stored"
        if not ok_dev:
            notes.append(why_dev)
        raw.append(dict(scheme=name, chosen=name == chosen, kind=info.kind, dtype=dtype, weight_bytes=int(w),
                        kv_cache_bytes=int(kv), kv_bytes_per_token=per_token, kv_tokens=int(tokens),
                        lora_ok=lora_ok, lora_note=lora_note, how=how, quantize_step=quantize_step,
                        usable=usable, note="; ".join(notes), inputs=kw))
    ref = next(r for r in raw if r["chosen"])
    rows = []
    for r in raw:
        rows.append(SchemeRow(weight_delta=r["weight_bytes"] - ref["weight_bytes"],
                              kv_tokens_delta=r["kv_tokens"] - ref["kv_tokens"],
                              max_concurrency=round(r["kv_tokens"] / budget.max_model_len, 2)
                              if budget.max_model_len else 0.0, **r))
    return tuple(rows)


__all__ = [
    "ARCH_LORA", "GiB", "MemoryBudget", "SchemeRow", "scheme_table", "scheme_bytes_inputs", "param_split", "MiB", "accepted_ranks", "detect_device", "detect_gpu_memory",
    "detect_host_memory", "gpu_overhead_bytes", "kv_bytes_per_token", "lora_layout", "lora_slot_bytes",
    "model_dtype", "parse_bytes", "round_rank", "supported_targets", "weight_bytes", "gib",
]
