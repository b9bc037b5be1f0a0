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


# ------------------------------------------------------------------------------------ --in-place
_TOKEN = re.compile(r"""'[^']*'|"[^"]*"|[^\s,}\]#]+""")


def pin_in_place(resolved: "ResolvedRecipe") -> list[str]:
    """Write the pins into the recipe files themselves (the file that wrote each source, `extends`
    included): `revision: <commit>` for every hub source on a branch/tag/short sha, `sha256:` for every
    adapter without one. Text edits at the positions the loader recorded, so comments and layout stay;
    each file is rewritten atomically, and the result is loaded again and must resolve to the same
    commits (else every file is restored). Returns what was pinned."""
    from .recipe import load_recipe
    from .sources import resolve

    loaded = resolved.loaded
    edits: dict[str, list[tuple[int, int, str, str]]] = {}  # file -> (line, col, kind, text)
    done: list[str] = []

    def add(src_path: tuple[Any, ...], key: str, value: str, existing: tuple[Any, ...] | None) -> None:
        loc = loaded.location(*existing) if existing else None
        src_loc = loaded.location(*src_path)
        same = loc is not None and src_loc is not None and (loc.file, loc.line, loc.column) == (
            src_loc.file, src_loc.line, src_loc.column)
        if loc is not None and not same:  # the key is written: replace its value
            edits.setdefault(loc.file, []).append((loc.line, loc.column, "replace", value))
        elif loc is not None:  # written as source@rev: replace the @rev part
            edits.setdefault(loc.file, []).append((loc.line, loc.column, "at", value))
        elif src_loc is not None:
            edits.setdefault(src_loc.file, []).append((src_loc.line, src_loc.column, "insert:" + key, value))
        else:
            return
        done.append(f"{'.'.join(map(str, src_path[:-1]))}.{key}: {value}")

    r = resolved.recipe
    for sp, rp, src in ((("backbone", "model"), ("backbone", "revision"), resolved.backbone),
                        (("backbone", "merge_base"), ("backbone", "merge_base_revision"), resolved.merge_base)):
        if src is not None and src.kind == "hf" and src.commit and src.revision != src.commit:
            add(sp, "revision" if rp[-1] == "revision" else rp[-1], src.commit, rp if loaded.location(*rp) else None)
    for a in resolved.adapters:
        sp, rp = ("adapters", a.index, "source"), ("adapters", a.index, "revision")
        if a.source.kind == "hf" and a.source.commit and a.source.revision != a.source.commit:
            add(sp, "revision", a.source.commit, rp if loaded.location(*rp) else None)
        if a.weights_file and r.adapters[a.index].sha256 is None:
            add(sp, "sha256", sha256_file(a.path / a.weights_file), None)
    originals: dict[str, str] = {}
    for file, es in edits.items():
        text = Path(file).read_text()
        originals[file] = text
        atomic_write_text(file, _apply(text, es))
    try:
        again = resolve(load_recipe(loaded.path), fetch="metadata", offline=True, progress=False)
        bad = [s.spec for s, t in ((again.backbone, resolved.backbone), (again.merge_base, resolved.merge_base))
               if s is not None and t is not None and s.commit != t.commit]
        if bad:
            raise LaunchError(f"lock --in-place: {', '.join(bad)} no longer resolve to the locked commits")
    except Exception:
        for file, text in originals.items():
            atomic_write_text(file, text)
        raise
    return done


def _apply(text: str, edits: list[tuple[int, int, str, str]]) -> str:
    lines = text.splitlines(keepends=True)
    by_pos: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for line, col, kind, value in edits:
        by_pos.setdefault((line, col), []).append((kind, value))
    for (line, col), items in sorted(by_pos.items(), reverse=True):
        s = lines[line - 1]
        m = _TOKEN.match(s, col - 1)
        end = m.end() if m else col - 1
        inserts = [(k.split(":", 1)[1], v) for k, v in items if k.startswith("insert:")]
        for kind, value in items:
            if kind == "replace":
                s = s[:col - 1] + value + s[end:]
            elif kind == "at" and m:
                tok = m.group(0)
                q = tok[0] if tok[0] in "'\"" else ""
                body = tok[1:-1] if q else tok
                s = s[:col - 1] + q + body.rsplit("@", 1)[0] + q + s[end:]
                inserts.insert(0, ("revision", value))
        if inserts:
            flow = "{" in s[:col - 1]
            if flow:  # `{name: a, source: x}`: add the keys after the value
                m = _TOKEN.match(s, col - 1)
                end = m.end() if m else col - 1
                s = s[:end] + "".join(f", {k}: {v}" for k, v in inserts) + s[end:]
            else:  # block style: new lines at the key's indentation
                head = s[:col - 1].rstrip().removesuffix(":").rstrip()  # "  - source" / "    model"
                key_col = len(head) - len(head.split()[-1])  # where the key starts ("- " excluded)
                nl = "" if s.endswith("\n") else "\n"
                s = s + nl + "".join(f"{' ' * key_col}{k}: {v}\n" for k, v in inserts)
        lines[line - 1] = s
    return "".join(lines)


def _fmt(s: dict[str, Any] | None) -> str:
    if not s:
        return "none"
    return s["spec"] + (f"@{s.get('commit')}" if s.get("commit") else "")


__all__ = ["LOCK_VERSION", "adapter_sha256", "drift", "lock_data", "lock_path", "pin_in_place", "read_lock",
           "write_lock"]
