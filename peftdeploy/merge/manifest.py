"""Manifest of a cache entry: size and SHA-256 of every file, stored in the completion marker.

The marker is written last, inside the directory that is then renamed into place, so an entry is
complete exactly when its manifest is there. Before an entry is served (`verify`):

* every listed file must exist with its size (a ``stat`` each: always);
* a file whose mtime changed since it was written is hashed again and must match;
* ``full=True`` (``peftdeploy merge --verify``, ``PEFTDEPLOY_VERIFY_CACHE=1``) hashes every file.

An entry that fails is a miss (merged again) with one line saying why. Entries without a manifest
(written before it existed) fail too, so they are rebuilt once.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .hashing import sha256_file

VERIFY_ENV = "PEFTDEPLOY_VERIFY_CACHE"


def _files(d: Path, skip: str) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != skip and not p.is_symlink())


def build(d: str | os.PathLike[str], *, skip: str) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256, mtime_ns]}`` of every file under `d` but `skip` (the marker)."""
    d = Path(d)
    files = _files(d, skip)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:  # hashlib drops the GIL
        digests = list(ex.map(sha256_file, files))
    out = {}
    for p, h in zip(files, digests):
        st = p.stat()
        out[p.relative_to(d).as_posix()] = [st.st_size, h, st.st_mtime_ns]
    return out


def verify(d: str | os.PathLike[str], manifest: Any, *, full: bool | None = None) -> str | None:
    """None when the entry at `d` matches `manifest`, else what is wrong (one line)."""
    if full is None:
        full = os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "yes")
    if not isinstance(manifest, dict) or not manifest:
        return "it has no manifest (an entry from an older peftdeploy)"
    d = Path(d)
    rehash = []
    for rel, rec in manifest.items():
        p = d / rel
        try:
            st = p.stat()
            size, digest, mtime = rec
        except (OSError, TypeError, ValueError):
            return f"{rel} is missing"
        if st.st_size != size:
            return f"{rel} has {st.st_size} bytes, not {size}"
        if full or st.st_mtime_ns != mtime:
            rehash.append((rel, p, digest))
    if rehash:
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            got = list(ex.map(lambda t: sha256_file(t[1]), rehash))
        for (rel, _p, digest), h in zip(rehash, got):
            if h != digest:
                return f"{rel} changed (sha256 {h[:12]}…, expected {digest[:12]}…)"
    return None


def report(d: Path, problem: str) -> None:
    print(f"peftdeploy: cache entry {d} failed verification: {problem}; building it again", file=sys.stderr)
