"""Delta adapters for the hybrid policy: serve every adapter exactly against a backbone that already
has the hot adapter H merged in.

With W' = W + s_H·B_H·A_H (the merge engine's output), adapter i is the exact LoRA delta

    W + s_i·B_i·A_i = W' + [s_i·B_i | −s_H·B_H] · [A_i ; A_H]

of rank r_i + r_H, and the bare backbone is W' − s_H·B_H·A_H (rank r_H). Requests for H then run
with no LoRA at all. A module adapted by only one of the two gets only its half (the other half is
zero). Delta adapters are written in float32 with lora_alpha = r (scale 1): the scales (alpha/r,
alpha/sqrt(r) for rsLoRA, rank/alpha patterns) are folded into B, so vLLM and PEFT apply them as
written. Modules with a smaller rank are zero-padded to the adapter's single rank (vLLM serves one
rank per adapter), which adds nothing to the product. `target_modules` lists the adapted modules by
their full names (PEFT then wraps exactly those; vLLM goes by the tensor names).

`build_delta_cached` is what `peftdeploy up` runs for mode hybrid: all delta adapters of one
deployment in one directory (one subdirectory per served name), built in a temporary directory next
to it and renamed into place with a completion marker that carries the content key (the adapters'
bytes and weights, the hot adapter, the base name, the format version), under a file lock. A second
build of the same inputs is a cache hit (a few stats, no torch import); a killed build never looks
complete. torch is needed (the `merge` extra) only when something is built.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable


from ..errors import MergeError
from ..util import dir_build, read_marker
from .cache import adapter_files
from .common import COMPLETE_MARKER, sha256_json
from .hashing import HashCache
from .lora import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LoraAdapter, open_adapter

if TYPE_CHECKING:
    import torch

# Part of the delta cache key: bump it whenever the same inputs would produce other bytes.
DELTA_FORMAT_VERSION = "2"
HASH_MEMO = ".file-hashes.json"
DELTA_NOTE = "peftdeploy-delta.json"  # what a delta adapter is (kind, hot adapter, rank), next to its config
_PREFIX = "base_model.model."

AdapterSpec = tuple[str, "str | os.PathLike[str]", float]  # (served name, adapter dir, weight)


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


def _load(ad: LoraAdapter, weight: float) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """module -> (A, scale·weight·B), in float32."""
    import torch

    out = {}
    for m in ad.modules.values():
        a = ad.tensor(m.a_key).to(torch.float32)
        b = ad.tensor(m.b_key).to(torch.float32) * (m.scale * weight)
        out[m.module] = (a, b)
    return out


def _write_adapter(out_dir: Path, tensors: dict[str, "torch.Tensor"], *, rank: int, targets: set[str],
                   base_model: str | None, note: dict[str, Any], dtype: "torch.dtype") -> None:
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_SAFETENSORS))
        cfg = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
            "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "base_model_name_or_path": base_model,
        }
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / DELTA_NOTE).write_text(json.dumps(note, indent=2) + "\n")  # not in the config: PEFT warns on unknown keys
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_delta_adapters(hot: AdapterSpec, others: list[AdapterSpec], out_root: str | os.PathLike[str], *,
                         base_name: str, dtype: "torch.dtype | None" = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write one delta adapter per entry of `others` and one for the bare backbone (`base_name`).

    hot / others: (name, adapter dir, weight). Returns {served name: adapter dir}. `dtype` of the
    written tensors: float32 (default) keeps the deltas exact.
    """
    import torch

    dtype = dtype or torch.float32
    out_root = Path(out_root)
    hname, hpath, hweight = hot
    names = [n for n, _, _ in others]
    if base_name == hname or base_name in names or len(set(names)) != len(names) or hname in names:
        raise MergeError(f"hybrid: served names must be distinct (hot {hname!r}, base {base_name!r}, "
                         f"others {names})", fix="rename the adapters or the recipe")
    with open_adapter(hpath, name=hname) as had:
        _check_plain(had)
        hot_t = _load(had, hweight)
        hbase = had.config.get("base_model_name_or_path")
    if not hot_t:
        raise MergeError(f"hot adapter {hname!r} adapts no module", fix="choose another policy.hybrid.hot")
    r_h = max(a.shape[0] for a, _ in hot_t.values())
    result: dict[str, Path] = {}

    # the bare backbone: W' - s_H B_H A_H
    if progress:
        progress(f"{base_name} (base: -{hname}, rank {r_h})")
    tens: dict[str, torch.Tensor] = {}
    for mod, (a, b) in hot_t.items():
        A = torch.zeros(r_h, a.shape[1])
        A[: a.shape[0]] = a
        B = torch.zeros(b.shape[0], r_h)
        B[:, : b.shape[1]] = -b
        tens[f"{_PREFIX}{mod}.lora_A.weight"] = A
        tens[f"{_PREFIX}{mod}.lora_B.weight"] = B
    _write_adapter(out_root / base_name, tens, rank=r_h, targets=set(hot_t),
                   base_model=hbase, note={"kind": "base", "hot": hname, "rank": r_h}, dtype=dtype)
    result[base_name] = out_root / base_name

    for name, path, weight in others:
        with open_adapter(path, name=name) as ad:
            _check_plain(ad)
            t = _load(ad, weight)
            base = ad.config.get("base_model_name_or_path")
        r_i = max((a.shape[0] for a, _ in t.values()), default=0)
        rank = r_i + r_h
        if progress:
            progress(f"{name} (rank {r_i} + {r_h} = {rank})")
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
        _write_adapter(out_root / name, tens, rank=rank, targets=set(t) | set(hot_t),
                       base_model=base, note={"kind": "delta", "adapter": name, "hot": hname, "rank": rank},
                       dtype=dtype)
        result[name] = out_root / name
    return result


# ------------------------------------------------------------------------------------------ cache
@dataclass
class DeltaResult:
    path: Path  # the delta directory (one subdirectory per served name)
    cache_hit: bool
    key: str
    seconds: float
    adapters: dict[str, Path] = field(default_factory=dict)  # served name -> adapter dir
    ranks: dict[str, int] = field(default_factory=dict)  # served name -> rank of its delta


def _adapter_identity(spec: AdapterSpec, hc: HashCache) -> dict[str, Any]:
    name, path, weight = spec
    cfg, w = adapter_files(name, path)
    hs = hc.sha256_many([cfg, w], threads=1)
    return {"name": name, "config_sha256": hs[str(cfg)], "weights_sha256": hs[str(w)], "weights_file": w.name,
            "weight": float(weight)}


def delta_key(hot: AdapterSpec, others: list[AdapterSpec], *, base_name: str,
              hash_cache: HashCache | None = None) -> tuple[str, dict[str, Any]]:
    """(key, identity) of a set of delta adapters: content of every input adapter, names, weights."""
    hc = hash_cache or HashCache(None)
    identity = {"format": DELTA_FORMAT_VERSION, "dtype": "float32", "base_name": base_name,
                "hot": _adapter_identity(hot, hc), "others": [_adapter_identity(o, hc) for o in others]}
    return sha256_json(identity), identity


def _hit(final: Path, key: str, t0: float) -> DeltaResult | None:
    m = read_marker(final)
    if not m or m.get("key") != key:
        return None
    ranks = {str(k): int(v) for k, v in (m.get("ranks") or {}).items()}
    if not all((final / n / ADAPTER_CONFIG).is_file() for n in ranks):
        return None
    return DeltaResult(final, True, key, time.perf_counter() - t0, {n: final / n for n in ranks}, ranks)


def build_delta_cached(hot: AdapterSpec, others: list[AdapterSpec], out_dir: str | os.PathLike[str], *,
                       base_name: str, progress: Callable[[str], None] | None = None,
                       lock_timeout: float = -1) -> DeltaResult:
    """The delta adapters of a hybrid deployment in `out_dir`: found there (same content key) or built now.

    Built into ``<parent>/.tmp-<name>-<pid>/``, the marker written last, renamed to `out_dir` (a
    previous build of other inputs is moved aside and deleted), serialized on
    ``<parent>/.<name>.lock``. `progress` gets one line per delta adapter.
    """
    t0 = time.perf_counter()
    final = Path(out_dir).expanduser().absolute()
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    hc = HashCache(parent / HASH_MEMO)
    key, identity = delta_key(hot, others, base_name=base_name, hash_cache=hc)
    hc.save()
    hit = _hit(final, key, t0)
    if hit:
        return hit
    def timed_out(lock_path: Path) -> Exception:
        return MergeError(f"timed out after {lock_timeout}s waiting for another build of {final}",
                          fix=f"wait for it, or remove a stale {lock_path} if no `peftdeploy up` is running")

    with dir_build(final, lock_timeout=lock_timeout, on_timeout=timed_out) as tmp:
        hit = _hit(final, key, t0)
        if hit:
            return hit
        built = build_delta_adapters(hot, others, tmp, base_name=base_name, progress=progress)
        ranks = {n: int(json.loads((d / ADAPTER_CONFIG).read_text())["r"]) for n, d in built.items()}
        marker = {"key": key, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "format": DELTA_FORMAT_VERSION, "hot": hot[0], "base_name": base_name, "ranks": ranks,
                  "identity": identity}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return DeltaResult(final, False, key, time.perf_counter() - t0, {n: final / n for n in ranks}, ranks)
