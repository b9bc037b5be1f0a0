"""A size-bounded local cache of fetched adapters, with LRU eviction and download-once locking.

Layout (``root`` = ``$PEFTDEPLOY_ADAPTER_CACHE_DIR``, else ``<peftdeploy cache>/plugin-adapters``)::

    root/<key>/                      one adapter directory (what vLLM loads)
    root/<key>/.peftdeploy-cache.json   metadata; its mtime is the entry's last use (LRU order)
    root/<key>/.pins/<pid>           "in use by process <pid>" (a vLLM server that registered it)
    root/.locks/<key>.lock           per-entry file lock (several processes share one cache)
    root/.tmp-<key>-<random>/        an entry being filled (renamed into place when complete)

Rules:

* ``get_or_create(key, fill)`` returns the entry, calling ``fill(tmp_dir)`` at most once per key even
  when threads *and* processes ask at the same time (a ``threading.Lock`` per key inside a process,
  a ``filelock.FileLock`` per key across processes).
* After an entry is added, least-recently-used entries are deleted until the total size is at
  most ``max_bytes`` (``$PEFTDEPLOY_ADAPTER_CACHE_BYTES``; ``None`` = unbounded). Entries that are
  *pinned* by a live process are never deleted: a vLLM server keeps the path of every adapter it
  registered and re-reads it whenever the adapter drops out of its CPU LoRA cache, so deleting it
  would fail later requests. The entry just added is never deleted either. When pinned entries
  alone exceed the bound, a warning says so (the bound is then exceeded until they are unpinned).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from ..util import cache_root, pid_alive

logger = logging.getLogger("vllm.peftdeploy")

META = ".peftdeploy-cache.json"
PINS = ".pins"


def default_cache_dir() -> Path:
    env = os.environ.get("PEFTDEPLOY_ADAPTER_CACHE_DIR")
    return Path(env).expanduser() if env else cache_root() / "plugin-adapters"


def default_max_bytes() -> int | None:
    """``$PEFTDEPLOY_ADAPTER_CACHE_BYTES`` ("20GiB", "500MB", "1e9"; unset or 0 = unbounded)."""
    raw = os.environ.get("PEFTDEPLOY_ADAPTER_CACHE_BYTES", "").strip()
    if not raw:
        return None
    from ..plan.memory import parse_bytes

    try:
        try:
            n = int(float(raw))
        except ValueError:
            n = parse_bytes(raw)
    except ValueError as e:
        logger.error("peftdeploy: ignoring PEFTDEPLOY_ADAPTER_CACHE_BYTES=%r: %s", raw, e)
        return None
    return n or None


def _dir_bytes(p: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


_pid_alive = pid_alive


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    bytes: int
    last_used: float
    pinned: bool
    meta: dict[str, Any]


class AdapterCache:
    """See the module docstring. Thread-safe; several processes may share one ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None = None, max_bytes: int | None = None, *,
                 lock_timeout: float = 600.0):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._pinned: set[str] = set()
        self.stats = {"hits": 0, "fills": 0, "evictions": 0}

    # -- locking ---------------------------------------------------------------------------
    def _lockdir(self) -> Path:
        d = self.root / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive access to one key, across threads and processes."""
        with self._guard:
            tl = self._locks.setdefault(key, threading.Lock())
        with tl:
            with FileLock(str(self._lockdir() / f"{key}.lock"), timeout=self.lock_timeout):
                yield

    # -- entries ---------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key

    def _complete(self, key: str) -> bool:
        return (self.path(key) / META).is_file()

    def touch(self, key: str) -> None:
        try:
            os.utime(self.path(key) / META)
        except FileNotFoundError:
            pass

    def get(self, key: str) -> Path | None:
        """The entry's directory if present (and mark it used), else None."""
        if self._complete(key):
            self.touch(key)
            self.stats["hits"] += 1
            return self.path(key)
        return None

    def get_or_create(self, key: str, fill: Callable[[Path], Any], *,
                      meta: dict[str, Any] | None = None) -> Path:
        """The entry for ``key``; when missing, ``fill(tmp_dir)`` populates it (once, under the lock).

        ``fill`` may raise: nothing is cached then and the exception propagates.
        """
        hit = self.get(key)
        if hit is not None:
            return hit
        with self.lock(key):
            hit = self.get(key)  # filled by another thread/process while we waited
            if hit is not None:
                return hit
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                fill(tmp)
                size = _dir_bytes(tmp)
                info = {**(meta or {}), "key": key, "bytes": size, "created": time.time()}
                (tmp / META).write_text(json.dumps(info, indent=1, sort_keys=True))
                final = self.path(key)
                if final.exists():  # an incomplete leftover (crash while deleting): replace it
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.stats["fills"] += 1
        self.evict(protect={key})
        return self.path(key)

    def entries(self) -> list[CacheEntry]:
        out: list[CacheEntry] = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            mp = d / META
            try:
                st = mp.stat()
                meta = json.loads(mp.read_text())
            except (FileNotFoundError, ValueError):
                continue
            size = int(meta.get("bytes") or 0) or _dir_bytes(d)
            out.append(CacheEntry(d.name, d, size, st.st_mtime, self.is_pinned(d.name), meta))
        return sorted(out, key=lambda e: e.last_used)

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    # -- pins ------------------------------------------------------------------------------
    def pin(self, key: str) -> None:
        """Mark the entry as in use by this process (it is never evicted while this process lives)."""
        d = self.path(key) / PINS
        try:
            d.mkdir(exist_ok=True)
            (d / str(os.getpid())).touch()
        except FileNotFoundError:
            return
        self._pinned.add(key)

    def unpin(self, key: str) -> None:
        try:
            (self.path(key) / PINS / str(os.getpid())).unlink()
        except FileNotFoundError:
            pass
        self._pinned.discard(key)

    def unpin_all(self) -> None:
        for k in list(self._pinned):
            self.unpin(k)

    def is_pinned(self, key: str) -> bool:
        d = self.path(key) / PINS
        if not d.is_dir():
            return False
        for f in d.iterdir():
            try:
                pid = int(f.name)
            except ValueError:
                continue
            if _pid_alive(pid):
                return True
            try:  # stale pin of a dead process
                f.unlink()
            except FileNotFoundError:
                pass
        return False

    # -- eviction --------------------------------------------------------------------------
    def evict(self, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete least-recently-used, unpinned entries until the total is within ``max_bytes``."""
        if self.max_bytes is None or not self.root.is_dir():
            return []
        evicted: list[str] = []
        with FileLock(str(self._lockdir() / ".evict.lock"), timeout=self.lock_timeout):
            entries = self.entries()
            total = sum(e.bytes for e in entries)
            for e in entries:  # oldest first
                if total <= self.max_bytes:
                    break
                if e.key in protect or e.pinned:
                    continue
                try:  # skip an entry someone holds right now (being re-filled or inspected)
                    with FileLock(str(self._lockdir() / f"{e.key}.lock"), timeout=0):
                        (e.path / META).unlink(missing_ok=True)  # incomplete from here on
                        shutil.rmtree(e.path, ignore_errors=True)
                except Timeout:
                    continue
                total -= e.bytes
                evicted.append(e.key)
                self.stats["evictions"] += 1
                logger.info("peftdeploy: adapter cache evicted %s (%d bytes, last used %.0f s ago); "
                            "cache now %d / %d bytes", e.key, e.bytes, time.time() - e.last_used, total,
                            self.max_bytes)
            if total > self.max_bytes:
                logger.warning("peftdeploy: adapter cache holds %d bytes, above its bound %d, because the "
                               "remaining entries are in use by running vLLM servers", total, self.max_bytes)
        return evicted


def materialize(src: Path, dst: Path) -> None:
    """Put the files of adapter directory ``src`` into ``dst``: hard links where possible, else copies.

    Symlinks (huggingface_hub snapshots link into blobs/) are resolved first.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.startswith(".") or f == META:
                continue
            s = Path(os.path.realpath(os.path.join(root, f)))
            t = dst / rel / f
            try:
                os.link(s, t)
            except OSError:
                shutil.copy2(s, t)


__all__ = ["AdapterCache", "CacheEntry", "default_cache_dir", "default_max_bytes", "materialize"]
