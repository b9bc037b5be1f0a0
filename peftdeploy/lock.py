"""Lock files: what a recipe resolved to, so a deployment can be repeated exactly (`peftdeploy lock`,
`peftdeploy up --locked`).

`lock_data(resolved)` records every hub revision as the commit sha it resolved to, every adapter
weights file's sha256, and the peftdeploy and vLLM versions. An adapter's sha256 comes from the hub's
LFS metadata where the huggingface_hub cache holds it (an LFS file's cache blob is named by its
sha256, which huggingface_hub checks on download), else it is computed from the file.
`drift(lock, resolved)` lists what differs now. Pure: no torch, no vLLM (versions from package metadata).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import LaunchError, Location
from .util import atomic_write_text, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from .sources import ResolvedRecipe, ResolvedSource

LOCK_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def lock_path(recipe: str | Path) -> Path:
    """`recipes/prod.yaml` -> `recipes/prod.lock.json` (next to the recipe)."""
    p = Path(recipe)
    return p.with_name(p.stem + ".lock.json")


def _source(src: "ResolvedSource | None") -> dict[str, Any] | None:
    if src is None:
        return None
    out: dict[str, Any] = {"spec": src.spec, "kind": src.kind}
    if src.kind == "hf":
        out.update(revision=src.revision or "main", commit=src.commit)
    return out


def adapter_sha256(path: Path) -> tuple[str, str]:
    """(sha256, where it came from): the hub's LFS sha256 (the cache blob's name) or computed."""
    if path.is_symlink():
        blob = path.resolve()
        if _SHA256.fullmatch(blob.name) and blob.parent.name == "blobs":
            return blob.name, "hub-lfs"
    return sha256_file(path), "computed"


def lock_data(resolved: "ResolvedRecipe") -> dict[str, Any]:
    from .plan.kernels import installed_vllm_version

    r = resolved.recipe
    unresolved = [s.spec for s in (resolved.backbone, resolved.merge_base) if s is not None
                  and s.kind == "hf" and not s.commit] + [a.source.spec for a in resolved.adapters
                                                          if a.source.kind == "hf" and not a.source.commit]
    if unresolved:
        raise LaunchError(f"cannot lock: {', '.join(unresolved)} did not resolve to a commit",
                          fix="run once online (unset HF_HUB_OFFLINE), or pre-download with `hf download`",
                          location=Location(file=str(resolved.loaded.path)))
    adapters: dict[str, Any] = {}
    for a in resolved.adapters:
        entry = _source(a.source) or {}
        if a.weights_file:
            digest, origin = adapter_sha256(a.path / a.weights_file)
            entry.update(file=a.weights_file, sha256=digest, sha256_from=origin)
        adapters[a.name] = entry
    return {
        "lock_version": LOCK_VERSION,
        "recipe": r.name,
        "recipe_hash": r.compute_hash(),
        "peftdeploy": __version__,
        "vllm": installed_vllm_version(),
        "backbone": _source(resolved.backbone),
        "merge_base": _source(resolved.merge_base),
        "adapters": adapters,
    }


def write_lock(resolved: "ResolvedRecipe", path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    data = lock_data(resolved)
    out = path or lock_path(resolved.loaded.path)
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return out, data


def read_lock(path: Path) -> dict[str, Any]:
    where = Location(file=str(path))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LaunchError(f"--locked: no lock file {path}", location=where,
                          fix="write it with `peftdeploy lock RECIPE` (and commit it next to the recipe)") from None
    except ValueError as e:
        raise LaunchError(f"--locked: {path} is not a lock file ({e})", location=where,
                          fix="re-create it with `peftdeploy lock RECIPE`") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
        raise LaunchError(f"--locked: {path} is not a version-{LOCK_VERSION} lock file", location=where,
                          fix="re-create it with `peftdeploy lock RECIPE`")
    return data


def drift(lock: dict[str, Any], resolved: "ResolvedRecipe") -> list[str]:
    """What differs between a lock and what the recipe resolves to now (empty: nothing drifted)."""
    from .plan.kernels import installed_vllm_version

    out: list[str] = []
    r = resolved.recipe
    if lock.get("recipe_hash") != r.compute_hash():
        out.append("the recipe changed since it was locked")
    if lock.get("peftdeploy") != __version__:
        out.append(f"peftdeploy {__version__} (locked {lock.get('peftdeploy')})")
    vllm = installed_vllm_version()
    if lock.get("vllm") != vllm:
        out.append(f"vLLM {vllm or 'not installed'} (locked {lock.get('vllm') or 'none'})")
    for what, src in (("backbone", resolved.backbone), ("merge_base", resolved.merge_base)):
        now, then = _source(src), lock.get(what)
        if now != then:
            out.append(f"{what}: {_fmt(now)} (locked {_fmt(then)})")
    locked_adapters = lock.get("adapters") or {}
    for a in resolved.adapters:
        then = locked_adapters.get(a.name)
        if then is None:
            out.append(f"adapter {a.name!r} is not in the lock")
            continue
        now = _source(a.source) or {}
        if {k: now.get(k) for k in ("spec", "commit")} != {k: then.get(k) for k in ("spec", "commit")}:
            out.append(f"adapter {a.name!r}: {_fmt(now)} (locked {_fmt(then)})")
        elif a.weights_file and then.get("sha256"):
            digest = sha256_file(a.path / a.weights_file)  # what will be served, computed now
            if digest != then["sha256"]:
                out.append(f"adapter {a.name!r}: {a.weights_file} sha256 {digest} (locked {then['sha256']})")
    for name in locked_adapters:
        if name not in {a.name for a in resolved.adapters}:
            out.append(f"adapter {name!r} is locked but no longer in the recipe")
    return out


def _fmt(s: dict[str, Any] | None) -> str:
    if not s:
        return "none"
    return s["spec"] + (f"@{s.get('commit')}" if s.get("commit") else "")


__all__ = ["LOCK_VERSION", "adapter_sha256", "drift", "lock_data", "lock_path", "read_lock", "write_lock"]
