"""The accuracy gate ``quantization.max_ppl_increase``: `up` refuses a quantized merge that lost more.

    rep = check_ppl_gate(merged_dir, quantized_dir, max_increase=0.05, scheme="w4a16", method="gptq",
                         merged_key=..., quantized_key=...)

Both models are scored by vLLM on the shipped eval text (:mod:`.ppl`, one child process, the same
activation dtype). The measurement is cached under ``<cache>/eval/<key>.json`` (key: both models'
content keys, the eval text's sha256, dtype, window, stride, and which CPU kernel build this host runs:
the same int8 checkpoint measured +2.8% on an AVX-512 VNNI CPU and +7.1% without VNNI, so a measurement
is only reused on a host of the same kind), so a second `up` of the same recipe reads it instead of
starting vLLM twice more.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from peftdeploy.errors import PeftDeployError
from peftdeploy.util import atomic_write_text, cache_root

GATE_VERSION = "2"  # 2: the host's CPU kernel build is part of the key


class QuantizationGateError(PeftDeployError):
    pass


def gate_key(merged_key: str, quantized_key: str, *, dtype: str, window: int, stride: int) -> str:
    from peftdeploy.quantize.ppl import eval_text_sha256

    from peftdeploy.quantize.cpu_isa import host_cpu_isa

    isa = host_cpu_isa()
    ident = {"v": GATE_VERSION, "merged": merged_key, "quantized": quantized_key, "text": eval_text_sha256(),
             "dtype": dtype, "window": window, "stride": stride,
             "cpu": f"{isa.library}{'+vnni' if isa.vnni else ''}{'+amx' if isa.amx else ''}" if isa is not None else None,
             "w4a8": os.environ.get("VLLM_CPU_INT4_W4A8", "0")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def measure_pair(merged_dir: str, quantized_dir: str, *, merged_key: str, quantized_key: str, dtype: str = "bfloat16",
                 window: int = 512, stride: int = 256, root: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """{"ppl_full", "ppl_quantized", "increase", "cache_hit", ...} for the two models (cached)."""
    from peftdeploy.quantize.ppl import PplError, eval_text_sha256, measure

    d = (root or cache_root()) / "eval"
    key = gate_key(merged_key, quantized_key, dtype=dtype, window=window, stride=stride)
    f = d / f"{key}.json"
    try:
        rep = json.loads(f.read_text())
        if rep.get("key") == key:
            return {**rep, "cache_hit": True}
    except (OSError, ValueError):
        pass
    (progress or (lambda m: None))(f"perplexity of the full-precision and the quantized model with vLLM ({dtype}) ...")
    t0 = time.perf_counter()
    try:
        full, quant = measure([merged_dir, quantized_dir], dtype=dtype, window=window, stride=stride)
    except PplError as e:
        raise QuantizationGateError(f"quantization.max_ppl_increase: the perplexity run failed: {e}\n"
                                    f"{e.log_tail[-1500:]}", fix="see the vLLM log above; or drop "
                                    "max_ppl_increase to serve without the check") from None
    rep = {"key": key, "ppl_full": full.ppl, "ppl_quantized": quant.ppl,
           "increase": (quant.ppl - full.ppl) / full.ppl, "tokens_scored": full.tokens_scored,
           "text_sha256": eval_text_sha256(), "dtype": dtype, "window": window, "stride": stride,
           "seconds": round(time.perf_counter() - t0, 2), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, json.dumps(rep, indent=2) + "\n")
    return {**rep, "cache_hit": False}


def check_ppl_gate(merged_dir: str, quantized_dir: str, *, max_increase: float, scheme: str, method: str,
                   merged_key: str, quantized_key: str, dtype: str = "bfloat16", recipe_file: str | None = None,
                   progress: Callable[[str], None] | None = None, root: Path | None = None) -> dict[str, Any]:
    """The measurement; raises :class:`QuantizationGateError` (exit 2) when the increase is over the limit."""
    rep = measure_pair(merged_dir, quantized_dir, merged_key=merged_key, quantized_key=quantized_key, dtype=dtype,
                       progress=progress, root=root)
    rep.update(max_increase=max_increase, passed=rep["increase"] <= max_increase)
    if not rep["passed"]:
        better = {"rtn": "quantization.method: gptq (calibrated; `bash scripts/setup_quantize.sh` installs it)",
                  "gptq": "more or closer-to-your-traffic calibration text (quantization.calibration), ",
                  "awq": "quantization.method: gptq, "}.get(method, "")
        where = f"{recipe_file}: " if recipe_file else ""
        raise QuantizationGateError(
            f"{where}quantization.max_ppl_increase: the {scheme} ({method}) checkpoint has perplexity "
            f"{rep['ppl_quantized']:.3f} on the eval text against {rep['ppl_full']:.3f} for the full-precision "
            f"merge: +{rep['increase']:.2%}, over the allowed +{max_increase:.2%}; not serving it",
            fix=f"use {better}a wider scheme (int8 / w8a16 keep more), or raise max_ppl_increase if this loss is "
                f"acceptable (measure variants with `peftdeploy eval {recipe_file or 'RECIPE'} --methods rtn,gptq`)")
    return rep
