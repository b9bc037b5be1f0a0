"""What each ``quantization.scheme`` means, where vLLM runs it, and what it costs — pure data.

No torch, no vllm import: ``peftdeploy plan`` reads this on machines without either. The facts
were read from the vLLM 0.32 source (``vllm/model_executor/layers/quantization/``,
``vllm/model_executor/kernels/linear/__init__.py`` kernel tables, ``vllm/lora/layers/``) and the
CPU rows were checked by loading checkpoints on a CPU without AMX (see ``tests/test_quantize.py``).

Policies
--------
* merge: adapters are merged in full precision first; then a *runtime* scheme is handed to vLLM
  (``--quantization fp8``: vLLM quantizes the merged weights while loading), an *offline* scheme is
  produced by :func:`peftdeploy.quantize.quantize_cached` from the merged model (compressed-tensors
  checkpoint; vLLM reads ``quantization_config`` from it, no flag), and a *prequantized* scheme
  (awq/gptq backbone) needs ``backbone.merge_base`` (the full-precision twin): the merge happens
  there and the result is quantized offline with :attr:`SchemeInfo.merge_offline_scheme`
  (w4a16 — the same 4-bit/group-128 weight-only format AWQ/GPTQ checkpoints have; RTN, not AWQ's
  activation-aware search).
* serve: the backbone is quantized (runtime flag, or the prequantized checkpoint itself); LoRA
  adapters stay in their own dtype and vLLM's LoRA layers add ``x @ A @ B`` next to the quantized
  base GEMM (``BaseLinearLayerWithLoRA`` calls ``base_layer.quant_method.apply`` — any dense Linear
  quant method works; the only thing LoRA turns off is feeding the base layer a pre-quantized
  activation, ``requires_unquantized_input``). An offline scheme in serve policy would mean
  quantizing the *backbone* alone; peftdeploy does that with the same quantizer (no merge).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["none", "runtime", "offline", "prequantized", "unsupported"]
Device = Literal["cuda", "rocm", "cpu", "xpu"]


@dataclass(frozen=True)
class SchemeInfo:
    name: str
    kind: Kind
    summary: str
    # --- serving ---------------------------------------------------------------------------
    vllm_quantization: str | None  # value for vLLM --quantization (None: none, or read from config.json)
    checkpoint_format: str | None  # what is on disk for offline/prequantized schemes
    devices: tuple[str, ...]  # where vLLM 0.32 has kernels for it
    device_notes: dict[str, str] = field(default_factory=dict)  # per device: kernel / condition / why not
    # --- LoRA (serve policy) ---------------------------------------------------------------
    lora_supported: bool = True
    lora_note: str = ""
    # --- merge policy ----------------------------------------------------------------------
    merge_action: str = ""  # "none" | "vllm-load-time" | "quantize-merged" | "needs-merge-base" | "refuse"
    merge_offline_scheme: str | None = None  # offline scheme the merged model is quantized to
    # --- memory model ----------------------------------------------------------------------
    weight_bits: float = 16.0  # bits of one quantized Linear weight element on the device (no scales)
    group_size: int | None = None  # scale granularity along the input dim (None: per channel/tensor)
    scale_bytes: int = 2  # bytes of one scale value (model dtype; fp32 for fp8 runtime)
    quantizes_embeddings: bool = False  # embeddings / lm_head stay in the model dtype for all schemes
    activations: str = "unquantized"  # "int8 dynamic per-token" | "fp8 dynamic per-tensor" | ...
    kv_cache_note: str = ("weights only: KV bytes per token are unchanged (set quantization.kv_cache_dtype: "
                          "fp8 to halve them); the bytes the weights free go to KV cache blocks")
    refused_reason: str | None = None  # set when peftdeploy refuses the scheme outright
    cpu_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")  # activation dtypes its CPU kernel takes
    lora_unsupported: dict[str, str] = field(default_factory=dict)  # device -> why LoRA cannot run on it

    def linear_bytes_per_param(self, in_features: int | None = None) -> float:
        """Bytes per quantized Linear weight element, scales included.

        Per-channel schemes add one scale per output row (``scale_bytes / in_features`` per
        element); group schemes one per group.
        """
        b = self.weight_bits / 8.0
        if self.kind == "none":
            return b
        if self.group_size:
            return b + self.scale_bytes / self.group_size
        if in_features:
            return b + self.scale_bytes / in_features
        return b

    def supported_on(self, device: str) -> tuple[bool, str]:
        """(ok, reason) for running this scheme in vLLM on `device` ("cuda", "cpu", ...)."""
        if self.refused_reason:
            return False, self.refused_reason
        d = device.lower()
        if d == "gpu":
            d = "cuda"
        note = self.device_notes.get(d, "")
        if d in self.devices:
            return True, note
        return False, note or f"vLLM 0.32 has no {self.name} kernel for {d}"

    def runs_on_this_host(self, device: str) -> tuple[bool, str]:
        """:meth:`supported_on`, plus what this machine's CPU lacks (``cpu_isa``) when `device` is cpu."""
        ok, why = self.supported_on(device)
        if ok and device.lower() == "cpu":
            from .cpu_isa import host_cpu_isa

            isa = host_cpu_isa()
            missing = isa.missing_kernel(self.name) if isa is not None else None
            if missing:
                return False, missing
        return ok, why

    def lora_ok(self, device: str = "cuda") -> tuple[bool, str]:
        """(ok, reason) for serve policy: LoRA adapters (unmerged) on a backbone with this scheme."""
        ok, why = self.supported_on(device)
        if not ok:
            return False, why
        d = "cuda" if device.lower() == "gpu" else device.lower()
        if d in self.lora_unsupported:
            return False, self.lora_unsupported[d]
        return self.lora_supported, self.lora_note


_LORA_GENERIC = ("vLLM LoRA wraps the quantized Linear (BaseLinearLayerWithLoRA calls the base "
                 "quant_method.apply) and adds the LoRA product in the activation dtype; adapters stay in "
                 "their own dtype")

SCHEMES: dict[str, SchemeInfo] = {
    "none": SchemeInfo(
        name="none", kind="none", summary="no quantization: weights in the model dtype",
        vllm_quantization=None, checkpoint_format=None, devices=("cuda", "rocm", "cpu", "xpu"),
        lora_supported=True, lora_note="unquantized backbone", merge_action="none",
        weight_bits=16.0, scale_bytes=0,
    ),
    "fp8": SchemeInfo(
        name="fp8", kind="runtime",
        summary="fp8 (e4m3) weights, quantized by vLLM while loading (--quantization fp8); dynamic fp8 "
                "activations",
        vllm_quantization="fp8", checkpoint_format=None, devices=("cuda", "rocm", "xpu"),
        device_notes={
            "cuda": "native fp8 GEMM on compute capability >= 8.9 (Ada/Hopper); older GPUs fall back to "
                    "weight-only fp8 (Marlin)",
            "cpu": "vLLM 0.32 CPU cannot quantize to fp8 at load time: the online fp8 method "
                   "(quantization/online/fp8.py process_weights_after_loading) calls ops.scaled_fp8_quant, "
                   "whose _C::static_scaled_fp8_quant op is an empty stub in the CPU build (checked: engine "
                   "start fails with bfloat16 on the demo model). The CPU platform itself restricts nothing "
                   "(CpuPlatform.supported_quantization is empty) and its CPUFP8* kernels (AMX) serve "
                   "pre-quantized fp8 checkpoints only. On CPU use int8 (W8A8) or w4a16 with policy.mode: merge",
        },
        lora_supported=True, lora_note=_LORA_GENERIC,
        merge_action="vllm-load-time", weight_bits=8.0, scale_bytes=4, activations="fp8 dynamic",
        cpu_dtypes=("bfloat16", "float16"),  # Fp8Config.get_supported_act_dtypes
    ),
    "int8": SchemeInfo(
        name="int8", kind="offline",
        summary="W8A8 int8: int8 per-channel symmetric weights + int8 dynamic per-token activations; "
                "compressed-tensors int-quantized checkpoint made by peftdeploy (RTN)",
        vllm_quantization=None, checkpoint_format="compressed-tensors/int-quantized",
        devices=("cuda", "rocm", "cpu", "xpu"),
        device_notes={
            "cuda": "CUTLASS int8 scaled-mm (compute capability >= 7.5)",
            "cpu": "CPUInt8ScaledMMLinearKernel (oneDNN int8 GEMM; AVX512-VNNI/AMX); verified on CPU vLLM "
                   "0.32 (float32 and bfloat16 activations)",
        },
        lora_supported=True, lora_note=_LORA_GENERIC + " (the LoRA branch sees the unquantized activation)",
        lora_unsupported={"cpu": "vLLM 0.32's CPU int8 kernel (CPUInt8ScaledMMLinearKernel) drops the layer's "
                                 "weight after packing it for oneDNN, and LoRA setup reads it ('NoneType' object "
                                 "has no attribute 'device'): measured, the engine does not start"},
        merge_action="quantize-merged", merge_offline_scheme="int8",
        weight_bits=8.0, activations="int8 dynamic per-token",
    ),
    "w8a16": SchemeInfo(
        name="w8a16", kind="offline",
        summary="int8 per-channel weight-only (activations in the model dtype); compressed-tensors "
                "pack-quantized checkpoint made by peftdeploy (RTN)",
        vllm_quantization=None, checkpoint_format="compressed-tensors/pack-quantized",
        devices=("cuda", "rocm"),
        device_notes={
            "cuda": "Marlin / Machete mixed-precision kernels (uint8b128)",
            "cpu": "vLLM 0.32's CPU weight-only kernels (CPUWNA16, Dynamic4bit, Zentorch) take 4-bit "
                   "weights only (uint4/uint4b8/int4): an 8-bit weight-only checkpoint fails to load "
                   "on CPU. Use int8 (W8A8) on CPU instead",
        },
        lora_supported=True, lora_note=_LORA_GENERIC,
        merge_action="quantize-merged", merge_offline_scheme="w8a16",
        weight_bits=8.0,
    ),
    "w4a16": SchemeInfo(
        name="w4a16", kind="offline",
        summary="int4 symmetric per-group (group 128, or the largest of 64/32 dividing every layer) "
                "weight-only; compressed-tensors pack-quantized checkpoint made by peftdeploy (RTN)",
        vllm_quantization=None, checkpoint_format="compressed-tensors/pack-quantized",
        devices=("cuda", "rocm", "cpu", "xpu"),
        device_notes={
            "cuda": "Machete (Hopper) / Marlin kernels",
            "cpu": "CPUWNA16LinearKernel (cpu_gemm_wna16; input/output sizes multiple of 32); activations "
                   "must be bfloat16 or float16 — cpu_gemm_wna16 has no float32 path (serve with --dtype "
                   "bfloat16); verified on CPU vLLM 0.32",
        },
        lora_supported=True, lora_note=_LORA_GENERIC,
        merge_action="quantize-merged", merge_offline_scheme="w4a16",
        weight_bits=4.0, group_size=128, cpu_dtypes=("bfloat16", "float16"),
    ),
    "awq": SchemeInfo(
        name="awq", kind="prequantized",
        summary="pre-quantized AWQ backbone (4-bit, group 128, with zero points); vLLM reads it as "
                "awq / awq_marlin",
        vllm_quantization="awq", checkpoint_format="awq",
        devices=("cuda", "rocm", "cpu", "xpu"),
        device_notes={
            "cuda": "awq_marlin (compute capability >= 8.0), awq Triton otherwise",
            "cpu": "AWQ checkpoints are repacked for CPUWNA16 (auto_awq.py CPU path)",
        },
        lora_supported=True, lora_note=_LORA_GENERIC,
        merge_action="needs-merge-base", merge_offline_scheme="w4a16",
        weight_bits=4.0, group_size=128, scale_bytes=2 + 1,  # fp16 scale + packed 4-bit zero (rounded up)
        cpu_dtypes=("bfloat16", "float16"),
    ),
    "gptq": SchemeInfo(
        name="gptq", kind="prequantized",
        summary="pre-quantized GPTQ backbone (usually 4-bit, group 128); vLLM reads it as gptq / "
                "gptq_marlin",
        vllm_quantization="gptq", checkpoint_format="gptq",
        devices=("cuda", "rocm", "cpu", "xpu"),
        device_notes={
            "cuda": "gptq_marlin (compute capability >= 8.0), exllama/Triton otherwise",
            "cpu": "4-bit GPTQ through the CPUWNA16 kernel",
        },
        lora_supported=True, lora_note=_LORA_GENERIC,
        merge_action="needs-merge-base", merge_offline_scheme="w4a16",
        weight_bits=4.0, group_size=128, cpu_dtypes=("bfloat16", "float16"),
    ),
    "bitsandbytes": SchemeInfo(
        name="bitsandbytes", kind="runtime",
        summary="bitsandbytes 4-bit (nf4) weights, quantized by vLLM while loading (--quantization "
                "bitsandbytes); QLoRA's training quantization",
        vllm_quantization="bitsandbytes", checkpoint_format=None, devices=("cuda",),
        device_notes={
            "cuda": "needs a GPU vLLM that still ships the bitsandbytes method and loader, and the "
                    "bitsandbytes package; the vLLM 0.32 source installed here has neither (its "
                    "QuantizationMethods keeps CUDA-only methods such as gptq_marlin / mxfp4, but not "
                    "bitsandbytes): pin the GPU host's vLLM to a release that has it",
            "cpu": "vLLM 0.32 (CPU) has no bitsandbytes quantization method or loader; on CPU use int8 (W8A8) "
                   "or w4a16 with policy.mode: merge",
        },
        lora_supported=True,
        lora_note="vLLM serves LoRA adapters on a bitsandbytes backbone (QLoRA serving) where the method exists",
        merge_action="vllm-load-time", weight_bits=4.0, group_size=64, scale_bytes=4,
        cpu_dtypes=(),
    ),
}

RUNTIME_SCHEMES = tuple(k for k, v in SCHEMES.items() if v.kind == "runtime")
OFFLINE_SCHEMES = tuple(k for k, v in SCHEMES.items() if v.kind == "offline")
PREQUANTIZED_SCHEMES = tuple(k for k, v in SCHEMES.items() if v.kind == "prequantized")
_ALIASES = {"w8a8": "int8", "int8_w8a8": "int8", "int4": "w4a16", "fp8_dynamic": "fp8", "bnb": "bitsandbytes"}


def scheme_info(scheme: str | None) -> SchemeInfo:
    """The :class:`SchemeInfo` of a recipe's ``quantization.scheme`` (None -> "none")."""
    s = (scheme or "none").lower()
    s = _ALIASES.get(s, s)
    try:
        return SCHEMES[s]
    except KeyError:
        raise KeyError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}") from None


def backbone_bytes(scheme: str | None, *, linear_params: int, other_params: int, dtype_bytes: int = 2,
                   in_features: float | None = None, group_size: int | None = None,
                   scale_bytes: int | None = None) -> int:
    """Device bytes of the backbone weights under `scheme`.

    `linear_params`: elements of the decoder Linear weights (what is quantized); `other_params`:
    embeddings, lm_head, norms (kept in the model dtype, `dtype_bytes` each). `in_features`: a typical
    input size (hidden size) for the per-channel scale overhead; `group_size` overrides the scheme's;
    `scale_bytes` overrides the scheme's scale size (peftdeploy's offline checkpoints store scales in
    the model dtype). For "none" everything is `dtype_bytes` per element.
    """
    info = scheme_info(scheme)
    if info.kind == "none" or info.kind == "unsupported":
        per = float(dtype_bytes) if info.kind == "none" else info.weight_bits / 8
        return int(linear_params * per + other_params * dtype_bytes)
    sb = info.scale_bytes if scale_bytes is None else scale_bytes
    g = group_size if (group_size and info.group_size) else info.group_size
    if g:
        per = info.weight_bits / 8 + sb / g
    elif in_features:
        per = info.weight_bits / 8 + sb / in_features
    else:
        per = info.weight_bits / 8
    return int(round(linear_params * per + other_params * dtype_bytes))
