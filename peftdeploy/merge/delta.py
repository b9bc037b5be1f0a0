"""Delta adapters for the hybrid policy: serve every adapter exactly against a backbone that already
has the hot adapter H merged in.

With W' = W + s_H·B_H·A_H (the merge engine's output), adapter i is the exact LoRA delta

    W + s_i·B_i·A_i = W' + [s_i·B_i | −s_H·B_H] · [A_i ; A_H]

of rank r_i + r_H, and the bare backbone is W' − s_H·B_H·A_H (rank r_H). Requests for H then run
with no LoRA at all. Delta adapters are written with lora_alpha = r (scale 1): the scales are folded
into B, so vLLM and PEFT apply them as written. Modules with a smaller rank are zero-padded to the
adapter's single rank (vLLM serves one rank per adapter), which adds nothing to the product.
Written atomically into a directory per adapter; torch is needed (the `merge` extra).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import MergeError
from .lora import LoraAdapter, open_adapter

_PREFIX = "base_model.model."


def _check_plain(ad: LoraAdapter) -> None:
    bad = []
    if ad.use_dora:
        bad.append("DoRA")
    if ad.replacements:
        bad.append("modules_to_save / replaced tensors")
    for m in ad.modules.values():
        if m.kind != "linear":
            bad.append(f"embedding LoRA on {m.module}")
            break
        if m.bias_key:
            bad.append(f"lora_bias on {m.module}")
            break
        if m.fan_in_fan_out:
            bad.append("fan_in_fan_out (Conv1D) modules")
            break
    if bad:
        raise MergeError(f"adapter {ad.name!r} cannot take part in the hybrid policy: {', '.join(bad)}",
                         fix="use policy.mode: serve (or merge) for this recipe")


def _load(ad: LoraAdapter, weight: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, scale·weight·B), in float32."""
    out = {}
    for m in ad.modules.values():
        a = ad.tensor(m.a_key).to(torch.float32)
        b = ad.tensor(m.b_key).to(torch.float32) * (m.scale * weight)
        out[m.module] = (a, b)
    return out


def _write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], *, rank: int, targets: set[str],
                   base_model: str | None, note: dict[str, Any], dtype: torch.dtype) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
        cfg = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
            "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "base_model_name_or_path": base_model, "peftdeploy_delta": note,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_delta_adapters(hot: tuple[str, str | os.PathLike[str], float],
                         others: list[tuple[str, str | os.PathLike[str], float]],
                         out_root: str | os.PathLike[str], *, base_name: str,
                         dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write one delta adapter per entry of `others` and one for the bare backbone (`base_name`).

    hot / others: (name, adapter dir, weight). Returns {served name: adapter dir}.
    """
    out_root = Path(out_root)
    hname, hpath, hweight = hot
    with open_adapter(hpath, name=hname) as had:
        _check_plain(had)
        hot_t = _load(had, hweight)
        hbase = had.config.get("base_model_name_or_path")
    r_h = max(a.shape[0] for a, _ in hot_t.values())
    result: dict[str, Path] = {}

    # the bare backbone: W' - s_H B_H A_H
    tens: dict[str, torch.Tensor] = {}
    for mod, (a, b) in hot_t.items():
        A = torch.zeros(r_h, a.shape[1]); A[: a.shape[0]] = a
        B = torch.zeros(b.shape[0], r_h); B[:, : b.shape[1]] = -b
        tens[f"{_PREFIX}{mod}.lora_A.weight"] = A
        tens[f"{_PREFIX}{mod}.lora_B.weight"] = B
    _write_adapter(out_root / base_name, tens, rank=r_h, targets={m.rsplit(".", 1)[-1] for m in hot_t},
                   base_model=hbase, note={"kind": "base", "hot": hname}, dtype=dtype)
    result[base_name] = out_root / base_name

    for name, path, weight in others:
        with open_adapter(path, name=name) as ad:
            _check_plain(ad)
            t = _load(ad, weight)
            base = ad.config.get("base_model_name_or_path")
        r_i = max(a.shape[0] for a, _ in t.values())
        rank = r_i + r_h
        tens = {}
        for mod in sorted(set(t) | set(hot_t)):
            ai_bi = t.get(mod)
            ah_bh = hot_t.get(mod)
            ref_a, ref_b = ai_bi or ah_bh  # type: ignore[misc]
            A = torch.zeros(rank, ref_a.shape[1])
            B = torch.zeros(ref_b.shape[0], rank)
            if ai_bi is not None:
                a, b = ai_bi
                A[: a.shape[0]] = a
                B[:, : b.shape[1]] = b
            if ah_bh is not None:
                a, b = ah_bh
                if ai_bi is not None and (a.shape[1] != ai_bi[0].shape[1] or b.shape[0] != ai_bi[1].shape[0]):
                    raise MergeError(f"adapters {name!r} and {hname!r} disagree on the shape of {mod}",
                                     fix="both adapters must be trained on the same backbone")
                A[r_i: r_i + a.shape[0]] = a
                B[:, r_i: r_i + b.shape[1]] = -b
            tens[f"{_PREFIX}{mod}.lora_A.weight"] = A
            tens[f"{_PREFIX}{mod}.lora_B.weight"] = B
        _write_adapter(out_root / name, tens, rank=rank, targets={m.rsplit(".", 1)[-1] for m in set(t) | set(hot_t)},
                       base_model=base, note={"kind": "delta", "adapter": name, "hot": hname}, dtype=dtype)
        result[name] = out_root / name
    return result
