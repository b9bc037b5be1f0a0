"""The PEFT LoRA adapter format: tensor names and the checks of adapter_config.json.

What `inspect` (planning, metadata only) and `merge` (reading the weights) both need to agree on; no
numpy, torch or file I/O here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .safetensors_format import _int

_LORA_RE = re.compile(r"^(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                      r"lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")

def _strip_prefix(name: str) -> str:
    for pre in ("base_model.model.", "base_model."):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def parse_lora_name(name: str) -> tuple[str, str] | None:
    """('model.layers.0.self_attn.q_proj', 'lora_A') for a PEFT LoRA tensor name, else None."""
    m = _LORA_RE.match(_strip_prefix(name))
    if not m:
        return None
    return m.group("mod"), m.group("kind")


class AdapterConfigError(ValueError):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


MAX_SCALE = 1e4  # lora_alpha / r beyond this is no trained adapter (and overflows bf16 weights)
LORA_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def check_adapter_config(cfg: Any, where: str) -> dict[str, Any]:
    """Validate the fields of adapter_config.json that the scale and shapes depend on; the one check `plan`
    (inspect_adapter) and `merge` (merge.lora.open_adapter) share. Returns cfg; raises AdapterConfigError."""
    fix = "fix adapter_config.json (peft's LoraConfig writes it), or re-save the adapter with peft"
    if not isinstance(cfg, dict):
        raise AdapterConfigError(f"{where}: a JSON {type(cfg).__name__}, not an object", fix)

    def rank(v: Any, what: str) -> int:
        if not _int(v) or not 1 <= v <= 65536:
            raise AdapterConfigError(f"{where}: {what} is {json.dumps(v)[:40]}; a LoRA rank is an integer "
                                     "from 1 to 65536", fix)
        return v

    def alpha(v: Any, what: str, r: int) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        scale = (v / (math.sqrt(r) if cfg.get("use_rslora") else r)) if ok else None
        if not ok or scale > MAX_SCALE:  # type: ignore[operator]
            raise AdapterConfigError(f"{where}: {what} is {json.dumps(v)[:40]}; it must be a finite number > 0 "
                                     f"with alpha/r <= {MAX_SCALE:g} (0 merges nothing, NaN/inf poison the "
                                     "weights)", fix)
        return float(v)

    r = rank(cfg.get("r", 8), "r")
    alpha(cfg.get("lora_alpha", 8), "lora_alpha", r)
    for key, check in (("rank_pattern", None), ("alpha_pattern", None)):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            raise AdapterConfigError(f"{where}: {key} must be an object (module pattern -> value)", fix)
        for k, v in pat.items():
            if key == "rank_pattern":
                rank(v, f"rank_pattern[{k!r}]")
            else:
                alpha(v, f"alpha_pattern[{k!r}]", r)
    return cfg
