"""File hashing with a small persistent memo.

``sha256_file`` streams a file through SHA-256 in 8 MiB blocks (constant memory; ``hashlib`` drops
the GIL for large updates, so several files hash in parallel threads).

``HashCache`` remembers the SHA-256 of a file keyed by its resolved path, size, mtime (ns) and inode
in a JSON file, so the second merge (or cache lookup) over the same backbone costs one ``stat`` per
file instead of reading gigabytes. A file rewritten in place keeps its inode but changes its mtime
and so is re-hashed; a tool that rewrites a file and restores its mtime defeats the memo (as it
would defeat ``make`` or ``rsync``).

Files in a Hugging Face hub cache are symlinks ``snapshots/<rev>/<file> -> ../../blobs/<sha256>``
for LFS files: the blob's name *is* its SHA-256, which the hub checked at download, so such files
are not read at all (``trust_hub_blobs=True``, the default).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable


_BLOCK = 8 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_file(path: str | os.PathLike[str], h: Any, *, block: int = _BLOCK) -> Any:
    """Stream a file through hasher `h` (anything with ``update``) in `block`-sized reads; returns `h`."""
    buf = bytearray(block)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h


def sha256_file(path: str | os.PathLike[str], *, block: int = _BLOCK) -> str:
    return hash_file(path, hashlib.sha256(), block=block).hexdigest()


def hub_blob_sha256(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 a huggingface_hub cache encodes in a symlinked LFS blob's name, if it does."""
    p = Path(path)
    if not p.is_symlink():
        return None
    target = p.resolve()
    if target.parent.name == "blobs" and _HEX64.match(target.name):
        return target.name
    return None


class HashCache:
    """SHA-256 of files, memoized on disk by (path, size, mtime_ns, inode)."""

    def __init__(self, path: str | os.PathLike[str] | None, *, trust_hub_blobs: bool = True):
        self.path = Path(path) if path else None
        self.trust_hub_blobs = trust_hub_blobs
        self._mem: dict[str, dict] = {}
        self._dirty: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # bytes actually read and hashed by this instance (for tests/stats)
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self._mem = {k: v for k, v in data.get("files", {}).items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self._mem = {}

    @staticmethod
    def _stat_key(p: Path) -> tuple[str, dict]:
        real = p.resolve()
        st = real.stat()
        return str(real), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}

    def lookup(self, path: str | os.PathLike[str]) -> str | None:
        """The memoized hash if the file is unchanged, without reading it."""
        p = Path(path)
        if self.trust_hub_blobs:
            h = hub_blob_sha256(p)
            if h:
                return h
        key, stamp = self._stat_key(p)
        with self._lock:
            ent = self._mem.get(key)
        if ent and all(ent.get(k) == v for k, v in stamp.items()):
            return ent.get("sha256")
        return None

    def record(self, path: str | os.PathLike[str], digest: str, stamp: dict | None = None) -> None:
        key, now = self._stat_key(Path(path))
        stamp = stamp or now
        if stamp != now:  # the file changed while we hashed it: don't memoize
            return
        ent = dict(stamp, sha256=digest)
        with self._lock:
            self._mem[key] = ent
            self._dirty[key] = ent

    def sha256(self, path: str | os.PathLike[str]) -> str:
        h = self.lookup(path)
        if h:
            return h
        p = Path(path)
        _, stamp = self._stat_key(p)
        h = sha256_file(p)
        with self._lock:
            self.hashed_bytes += stamp["size"]
        self.record(p, h, stamp)
        return h

    def sha256_many(self, paths: Iterable[str | os.PathLike[str]], *, threads: int = 2) -> dict[str, str]:
        """Hash several files (in parallel threads for the ones not memoized); keys are str(path)."""
        paths = [Path(p) for p in paths]
        out: dict[str, str] = {}
        todo = []
        for p in paths:
            h = self.lookup(p)
            if h:
                out[str(p)] = h
            else:
                todo.append(p)
        if todo:
            if threads > 1 and len(todo) > 1:
                with ThreadPoolExecutor(max_workers=min(threads, len(todo))) as ex:
                    for p, h in zip(todo, ex.map(self.sha256, todo)):
                        out[str(p)] = h
            else:
                for p in todo:
                    out[str(p)] = self.sha256(p)
        return {str(p): out[str(p)] for p in paths}

    def save(self) -> None:
        """Merge our new entries into the JSON file (atomic replace, under a file lock)."""
        if not self.path or not self._dirty:
            return
        from filelock import FileLock  # imported here: ~25 ms that lookups need not pay

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data: dict = {}
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    data = {}
            except (OSError, ValueError):
                data = {}
            files = data.get("files") if isinstance(data.get("files"), dict) else {}
            with self._lock:
                files.update(self._dirty)
                self._dirty = {}
            # drop entries of files that no longer exist, to keep the memo small
            files = {k: v for k, v in files.items() if os.path.exists(k)}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "files": files}, indent=0, sort_keys=True))
            os.replace(tmp, self.path)
