"""Which quantization method a recipe gets, and where the llm-compressor tool venv is — pure, no torch.

    m = resolve_method("w4a16", "auto")   # Method(name="gptq", tool="llmcompressor", why="...") with the venv

Methods (``quantization.method``):

* ``rtn``: round-to-nearest, no data. int8 / w8a16 / w4a16 are written by peftdeploy's own streaming
  quantizer (:mod:`.rtn`: one tensor in memory, no extra venv, seconds); fp8 + rtn is llm-compressor's
  data-free ``FP8_DYNAMIC`` (an fp8 checkpoint; vLLM's CPU build cannot make fp8 at load time).
* ``gptq``: GPTQ on the calibration set (llm-compressor); for int8 (W8A8) SmoothQuant first, then GPTQ
  (settings: llmc_worker.INT8_GPTQ).
* ``awq``: AWQ's activation-aware scale search, then the weight quantization (llm-compressor; w4a16).
* ``runtime``: vLLM quantizes while loading (fp8, bitsandbytes: ``--quantization``).
* ``auto`` (default): offline schemes get gptq when the tool venv exists, else rtn (and ``plan``
  says which and why); fp8 / bitsandbytes stay runtime, as before this field existed.

RTN stays because it is the method that needs nothing: no tool venv (1.5 GB), no calibration data,
no model in memory (it streams), and it runs in seconds where GPTQ runs minutes on a CPU.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from peftdeploy.errors import PeftDeployError

TOOL_ENV = "PEFTDEPLOY_QUANTIZE_PYTHON"
SETUP_COMMAND = "bash scripts/setup_quantize.sh"
# scheme -> methods it takes besides auto (same table as peftdeploy.recipe.schema.SCHEME_METHODS)
METHODS: dict[str, tuple[str, ...]] = {
    "none": (), "fp8": ("runtime", "rtn"), "int8": ("rtn", "gptq"), "w8a16": ("rtn", "gptq"),
    "w4a16": ("rtn", "gptq", "awq"), "bitsandbytes": ("runtime",), "awq": ("rtn", "gptq", "awq"),
    "gptq": ("rtn", "gptq", "awq"),
}
CALIBRATED = ("gptq", "awq")
INT8_GPTQ_WHAT = "SmoothQuant + GPTQ"  # int8 gptq (llmc_worker.INT8_GPTQ), for plan


class ToolMissing(PeftDeployError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def tool_python() -> Path | None:
    """The tool venv's python: $PEFTDEPLOY_QUANTIZE_PYTHON ('' or 'none' = no tool), else
    <repo>/.venv-quantize/bin/python, else .venv-quantize next to the running venv."""
    env = os.environ.get(TOOL_ENV)
    if env is not None:
        if env.strip().lower() in ("", "none", "0"):
            return None
        p = Path(env).expanduser()
        return p if p.is_file() else None
    for base in (repo_root(), Path(sys.prefix).parent):
        p = base / ".venv-quantize" / "bin" / "python"
        if p.is_file():
            return p
    return None


def require_tool(what: str) -> Path:
    p = tool_python()
    if p is None:
        env = os.environ.get(TOOL_ENV)
        where = f"${TOOL_ENV}={env!r} is not a python" if env not in (None, "", "none", "0") else \
            f"no {repo_root() / '.venv-quantize'} (nor ${TOOL_ENV})"
        raise ToolMissing(f"{what} runs llm-compressor from its own tool venv, and there is none: {where}",
                          fix=f"run `{SETUP_COMMAND}` (creates .venv-quantize), or set quantization.method: rtn "
                              "(round-to-nearest, no calibration, no tool venv)")
    return p


@dataclass(frozen=True)
class Method:
    name: str  # rtn | gptq | awq | runtime | none
    tool: str  # "peftdeploy" (rtn.py) | "llmcompressor" | "vllm" | "none"
    why: str  # one line for plan

    @property
    def calibrated(self) -> bool:
        return self.name in CALIBRATED


def resolve_method(scheme: str, method: str = "auto", *, tool_present: bool | None = None) -> Method:
    """The method `scheme` is quantized with when the recipe says `method` (auto: the best installed)."""
    from peftdeploy.quantize.support import scheme_info

    si = scheme_info(scheme)
    s = si.name
    if si.kind == "none":
        return Method("none", "none", "no quantization")
    present = (tool_python() is not None) if tool_present is None else tool_present
    if method == "auto":
        if si.kind == "runtime":
            return Method("runtime", "vllm", f"vLLM quantizes to {s} while loading (--quantization "
                                             f"{si.vllm_quantization})")
        if present:
            return Method("gptq", "llmcompressor", "auto: GPTQ on the calibration set (llm-compressor, "
                          f"{INT8_GPTQ_WHAT if s == 'int8' else 'GPTQ'}; the quantize tool venv is installed)")
        return Method("rtn", "peftdeploy", f"auto: round-to-nearest (no quantize tool venv; `{SETUP_COMMAND}` "
                                           "enables GPTQ)")
    if method not in METHODS.get(s, ()):
        raise PeftDeployError(f"quantization.method {method!r} does not apply to scheme {s!r}",
                              fix=f"use auto | {' | '.join(METHODS.get(s, ()))}")
    if method == "runtime":
        return Method("runtime", "vllm", f"vLLM quantizes to {s} while loading")
    if method == "rtn":
        if s == "fp8":
            return Method("rtn", "llmcompressor", "fp8 dynamic checkpoint (llm-compressor FP8_DYNAMIC, data-free)")
        return Method("rtn", "peftdeploy", "round-to-nearest (peftdeploy's streaming quantizer, no calibration)")
    what = INT8_GPTQ_WHAT if (method == "gptq" and s == "int8") else method.upper()
    return Method(method, "llmcompressor", f"{what} on the calibration set (llm-compressor)")
