"""The LoRA shrink folded into the base layer's GEMM (CUDA, peftdeploy's punica wrapper).

A served step of 64 decode tokens over 8 rank-16 adapters spent 1.69 ms of its 8.8 ms in LoRA kernels on an
H200 (vLLM 0.26, Llama-3-8B shape; the merged model's step: 6.99 ms): 128 shrink launches (6.9 µs each) and
128 expand launches (6.3 µs), latency-bound — the adapters' bytes take ~0.14 ms at the memory bandwidth.
The shrink ``h = x · A_lᵀ`` reads the same x as the base GEMM ``x · Wᵀ``: with each slice's A stack stored
right below W, as ``ext = [W; A_0; ...; A_{S-1}]``, one cuBLAS GEMM yields the base output *and* every
adapter's rank-R intermediate for every token (``S · max_loras · rank`` more output columns: 384 of 6144 for
qkv), and a single Triton launch adds each token's ``h_l · B_lᵀ`` (`triton_ops.lora_gemm`). One launch per
layer instead of two, no fp32 scratch, and W is read once as before.

Storage: ``ext`` replaces the layer's weight and vLLM's A stacks, which become views of it (the
``weight`` parameter keeps its identity and shape; ``lora_a_stacked[s]`` keeps ``[max_loras, 1, R, K]``),
so vLLM's ``set_lora`` / ``reset_lora`` write adapters into ``ext`` unchanged, and memory is what it was.

A layer is converted when vLLM hands it peftdeploy's wrapper (``set_mapping``) and `why_not` finds
nothing: an unquantized, unsharded-LoRA linear layer of vLLM's plain classes (tensor parallelism only for
column-parallel layers: a row-parallel shard's h is a partial sum), in the LoRA dtype, whose LoRA rows
are at most `triton_ops.GEMM_MAX_SHARE` of its output rows (past that, computing every adapter for every
token costs more than it saves). Any other layer keeps the two-launch kernels — and so does a call the
converted path cannot take (a 3-D input, a bias other than the layer's). ``PEFTDEPLOY_LORA_GEMM_FUSE=0``
turns it off.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("vllm.peftdeploy")
ENV = "PEFTDEPLOY_LORA_GEMM_FUSE"
# vLLM 0.26's LoRA layer classes whose apply() runs `_apply_sync` (base GEMM, then add_lora_linear), and the
# base layer classes whose forward they reproduce (a subclass with its own forward takes `_apply_base_forward`)
LORA_LAYERS = ("ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA", "QKVParallelLinearWithLoRA",
               "MergedQKVParallelLinearWithLoRA", "RowParallelLinearWithLoRA")
BASE_LAYERS = ("ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear", "RowParallelLinear")
_said: set[str] = set()
_count = [0]


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def why_not(layer: Any) -> str | None:
    """Why `layer` keeps the two-launch LoRA kernels (None: its shrink can run inside its GEMM)."""
    from .triton_ops import GEMM_MAX_SHARE, SUPPORTED_DTYPES

    name, base = type(layer).__name__, getattr(layer, "base_layer", None)
    if name not in LORA_LAYERS or type(base).__name__ not in BASE_LAYERS:
        return f"{name} over {type(base).__name__}"
    if name == "RowParallelLinearWithLoRA" and getattr(layer, "tp_size", 1) > 1:
        return "row-parallel with tensor parallelism (the shrink is a partial sum there)"
    if getattr(getattr(layer, "lora_config", None), "fully_sharded_loras", False):
        return "fully_sharded_loras"
    if type(getattr(base, "quant_method", None)).__name__ != "UnquantizedLinearMethod":
        return f"quantized base layer ({type(getattr(base, 'quant_method', None)).__name__})"
    w, a = getattr(base, "weight", None), layer.lora_a_stacked
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_contiguous():
        return "base weight is not one contiguous matrix"
    if w.dtype not in SUPPORTED_DTYPES or any(t.dtype != w.dtype for t in (*a, *layer.lora_b_stacked)):
        return f"weights in {w.dtype}, LoRA in {a[0].dtype}"
    if any(t.shape != a[0].shape or not t.is_contiguous() for t in a) or a[0].shape[-1] != w.shape[1]:
        return "A stacks of different shapes"
    if sum(int(b.shape[-2]) for b in layer.lora_b_stacked) != w.shape[0]:
        return "B stacks do not cover the output"
    extra = len(a) * a[0].shape[0] * a[0].shape[2]
    if extra > GEMM_MAX_SHARE * w.shape[0]:
        return f"LoRA rows {extra} > {GEMM_MAX_SHARE:g} x the layer's {w.shape[0]} outputs"
    return None


def convert(layer: Any) -> None:
    """Store `layer`'s weight and A stacks as one matrix ``[W; A_0; ...]`` (see the module docstring)."""
    base, a = layer.base_layer, layer.lora_a_stacked
    w = base.weight
    n, k = w.shape
    max_loras, _, rank, _ = a[0].shape
    lr = max_loras * rank
    ext = torch.empty((n + len(a) * lr, k), dtype=w.dtype, device=w.device)
    ext[:n].copy_(w)
    for s, t in enumerate(a):
        ext[n + s * lr:n + (s + 1) * lr].copy_(t.reshape(lr, k))
    w.data = ext[:n]
    layer.lora_a_stacked = tuple(ext[n + s * lr:n + (s + 1) * lr].view(max_loras, 1, rank, k) for s in range(len(a)))
    bias = getattr(base, "bias", None)
    layer._pd_ext = ext
    layer._pd_bias_ext = (torch.cat([bias.detach(), bias.new_zeros(len(a) * lr)]) if isinstance(bias, torch.Tensor)
                          else None)
    layer._pd_gemm = (n, max_loras, rank)


def apply_fused(layer: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The converted layer's output for `x` (None: this call takes vLLM's path)."""
    ext = getattr(layer, "_pd_ext", None)
    if ext is None or x.dim() != 2:
        return None
    if bias is not None:
        if bias is not getattr(layer.base_layer, "bias", None) or layer._pd_bias_ext is None:
            return None
        bias = layer._pd_bias_ext
    if getattr(layer, "_pd_wide", False):  # the MLP's act_fn applies the LoRA expand (act_fused.py)
        return torch.nn.functional.linear(x, ext, bias)
    n, max_loras, rank = layer._pd_gemm
    return layer.punica_wrapper.add_lora_gemm(x, ext, bias, n, layer.lora_b_stacked, max_loras, rank)


def on_set_mapping(layer: Any, wrapper: Any) -> None:
    if not getattr(wrapper, "_pd_fuse_gemm", False) or getattr(layer, "_pd_ext", None) is not None:
        return
    why = why_not(layer)
    if why is None:
        convert(layer)
        _count[0] += 1
        if _count[0] == 1:
            logger.info("peftdeploy: LoRA kernels: the LoRA shrink runs inside the base GEMM (one launch per "
                        "layer for the LoRA); %s=0 turns it off", ENV)
    elif why not in _said:
        _said.add(why)
        logger.info("peftdeploy: LoRA kernels: two launches (shrink, expand) for %s: %s",
                    type(layer).__name__, why)


def install() -> bool:
    """Route vLLM's linear LoRA layers through `apply_fused` once their wrapper is peftdeploy's. Idempotent."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    if getattr(BaseLinearLayerWithLoRA, "_pd_gemm_fused", False):
        return True
    if not all(hasattr(BaseLinearLayerWithLoRA, m) for m in ("_apply_sync", "set_mapping", "create_lora_weights")):
        logger.info("peftdeploy: LoRA kernels: this vLLM's LoRA layers have no _apply_sync: no GEMM fusion")
        return False
    orig_sync, orig_map = BaseLinearLayerWithLoRA._apply_sync, BaseLinearLayerWithLoRA.set_mapping

    def _apply_sync(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = apply_fused(self, x, bias)
        return orig_sync(self, x, bias) if y is None else y

    def set_mapping(self: Any, punica_wrapper: Any) -> None:
        orig_map(self, punica_wrapper)
        on_set_mapping(self, punica_wrapper)

    BaseLinearLayerWithLoRA._apply_sync = _apply_sync
    BaseLinearLayerWithLoRA.set_mapping = set_mapping
    BaseLinearLayerWithLoRA._pd_gemm_fused = True
    return True
