"""A correctness fix for vLLM's CPU LoRA kernels, applied by the plugin in every vLLM process.

vLLM marks tokens of requests without an adapter with LoRA index -1. The GPU (Triton) kernels skip
those tokens; the CPU torch ops (vllm/lora/ops/torch_ops/lora_ops.py, vLLM 0.32) gather
``lora_weights[indices]``, and Python's negative indexing makes -1 select the *last LoRA slot*.
A base-model request batched together with LoRA requests then silently gets the adapter that sits
in slot max_loras-1 (seen here: base prompts answered in the json adapter's style under load).

The fix zeroes the shrink output (x·Aᵀ) of every token whose index is negative; the expand step
adds B·0 = 0 for them, so base tokens get exactly the base model, and LoRA tokens are unchanged.
Only the shrink op needs wrapping: sgmv_shrink calls the module-level bgmv_shrink, and every CPU
LoRA path (linear, packed slices, logits) goes shrink -> expand. Turn it off with
PEFTDEPLOY_CPU_LORA_FIX=0.
"""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("vllm.peftdeploy")
_MARK = "_peftdeploy_negative_index_fix"


def _fixed(orig: Any) -> Any:
    def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    scaling: float = 1.0) -> None:
        neg = lora_indices_tensor < 0
        if not bool(neg.any()):
            return orig(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        orig(inputs, lora_a_weights, output_tensor, lora_indices_tensor.clamp(min=0), scaling)
        rows = output_tensor.shape[0]
        mask = neg if neg.shape[0] == rows else neg[:rows]
        output_tensor[mask] = 0

    setattr(bgmv_shrink, _MARK, True)
    return bgmv_shrink


def apply() -> bool:
    """Patch vLLM's CPU LoRA shrink op if this process runs vLLM on the CPU. Idempotent."""
    if os.environ.get("PEFTDEPLOY_CPU_LORA_FIX", "1") in ("0", "false", "False"):
        return False
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        import vllm.lora.ops.torch_ops as pkg
        import vllm.lora.ops.torch_ops.lora_ops as ops
    except Exception:  # noqa: BLE001 - an older/newer vLLM without these modules: nothing to fix
        return False
    if getattr(ops.bgmv_shrink, _MARK, False):
        return True
    fixed = _fixed(ops.bgmv_shrink)
    ops.bgmv_shrink = fixed  # sgmv_shrink looks it up here
    pkg.bgmv_shrink = fixed
    try:
        import vllm.lora.punica_wrapper.punica_cpu as pc

        pc.bgmv_shrink = fixed
    except Exception:  # noqa: BLE001
        pass
    logger.debug("peftdeploy: patched vLLM's CPU LoRA shrink op for no-adapter tokens (index -1)")
    return True
