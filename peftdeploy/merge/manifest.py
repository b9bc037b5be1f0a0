"""Manifest of a cache entry: size and digest of every file, stored in the completion marker.

The digest is BLAKE3 (``blake3:<hex>``; ~6 GB/s a core here, against ~2 GB/s for SHA-256) when the
``blake3`` package is installed (it comes with vLLM and the ``merge`` extra), else SHA-256
(``sha256:<hex>``; a bare 64-hex digest is SHA-256 too). This is integrity against damage, not a
signature: whoever can rewrite the files can rewrite the marker. The merge engine hashes each shard
while it writes it (`stream_hasher`, from the staging buffers in memory: the direct writes leave no
page cache to re-read), so `build` only hashes what it was not told (`known`).

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

from .hashing import hash_file, sha256_file

VERIFY_ENV = "PEFTDEPLOY_VERIFY_CACHE"


def stream_hasher() -> Any:
    """A fresh hasher for `digest_of`: BLAKE3 when installed, else SHA-256 (``update`` + ``name``)."""
    try:
        import blake3

        return blake3.blake3()
    except ImportError:
        import hashlib

        return hashlib.sha256()


def digest_of(h: Any) -> str:
    return f"{h.name}:{h.hexdigest()}"


def file_digest(path: str | os.PathLike[str], algo: str | None = None) -> str:
    """``<algo>:<hex>`` of a file, with `algo` (``blake3`` / ``sha256``) or the default hasher."""
    if algo == "sha256":
        return "sha256:" + sha256_file(path)
    h = stream_hasher() if algo is None or algo == "blake3" else None
    if h is None or (algo == "blake3" and h.name != "blake3"):
        raise ValueError(f"digest {algo!r} cannot be computed here (pip install blake3)")
    hash_file(path, h)
    return digest_of(h)


def _split(digest: str) -> tuple[str, str]:
    algo, sep, hexd = digest.partition(":")
    return (algo, hexd) if sep else ("sha256", digest)


def _files(d: Path, skip: str) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != skip and not p.is_symlink())


def build(d: str | os.PathLike[str], *, skip: str, known: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """``{relative path: [size, digest, mtime_ns]}`` of every file under `d` but `skip` (the marker);
    `known`: digests computed while writing (relative path -> ``<algo>:<hex>``), not hashed again."""
    d = Path(d)
    files = _files(d, skip)
    known = known or {}
    todo = [p for p in files if p.relative_to(d).as_posix() not in known]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:  # both hashers drop the GIL
        hashed = dict(zip(todo, ex.map(file_digest, todo)))
    digests = [known.get(p.relative_to(d).as_posix()) or hashed[p] for p in files]
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
        def one(t: tuple[str, Path, Any]) -> str | None:
            try:
                return file_digest(t[1], _split(str(t[2]))[0])
            except ValueError:
                return None
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
            got = list(ex.map(one, rehash))
        for (rel, _p, digest), h in zip(rehash, got):
            algo, want = _split(str(digest))
            if h is None:
                return f"{rel} has a {algo} digest, which this installation cannot check (pip install {algo})"
            if _split(h)[1] != want:
                return f"{rel} changed ({algo} {_split(h)[1][:12]}…, expected {want[:12]}…)"
    return None


def report(d: Path, problem: str) -> None:
    print(f"peftdeploy: cache entry {d} failed verification: {problem}; building it again", file=sys.stderr)
