"""Quantization of merged models (merge policy) and what each scheme means (plan / serve policy).

    from peftdeploy.quantize import quantize_cached, scheme_info
    qdir = quantize_cached(merged_dir, "int8")          # compressed-tensors checkpoint, cached
    scheme_info("w4a16").supported_on("cpu")           # (True, "CPUWNA16LinearKernel ...")

* :mod:`.support`  — pure data (no torch): :func:`scheme_info` -> :class:`SchemeInfo`.
* :mod:`.rtn`      — streaming round-to-nearest quantizer writing compressed-tensors checkpoints.
* :mod:`.methods`  — which method (rtn | gptq | awq | runtime) a recipe gets; the tool venv (pure).
* :mod:`.calibration` — the calibration text (shipped, sha256-pinned; or a team's own) (pure).
* :mod:`.llmc`     — GPTQ / AWQ / SmoothQuant / FP8 with llm-compressor, a subprocess in .venv-quantize.
* :mod:`.gate`     — ``quantization.max_ppl_increase``: `up` refuses a quantized merge that lost more.
* :mod:`.cache`    — content-addressed cache of quantized checkpoints (:func:`quantize_cached`).
* :mod:`.ppl`      — perplexity with vLLM on the fixed text in ``peftdeploy/data/eval/``.
* :mod:`.qlora`    — which quantization an adapter was trained against (QLoRA), vs the served one.
* :mod:`.evaluate` — the ``peftdeploy eval`` report (the command: peftdeploy/commands/eval_cmd.py).

Importing this package imports neither torch nor vllm (the heavy parts load lazily).
"""
from __future__ import annotations

from typing import Any

from peftdeploy.quantize.qlora import qlora_base_quant, qlora_match
from peftdeploy.quantize.support import SCHEMES, SchemeInfo, backbone_bytes, scheme_info

__all__ = ["SCHEMES", "SchemeInfo", "backbone_bytes", "scheme_info", "qlora_base_quant", "qlora_match",
           "quantize_cached", "quantize_cached_result", "lookup_quantized", "quantize_model", "measure"]


def __getattr__(name: str) -> Any:  # lazy: torch-using modules
    if name in ("quantize_cached", "quantize_cached_result", "lookup_quantized", "default_quant_cache_root"):
        from peftdeploy.quantize import cache

        return getattr(cache, name)
    if name in ("quantize_model", "QUANTIZER_VERSION"):
        from peftdeploy.quantize import rtn

        return getattr(rtn, name)
    if name == "measure":
        from peftdeploy.quantize.ppl import measure

        return measure
    raise AttributeError(name)
