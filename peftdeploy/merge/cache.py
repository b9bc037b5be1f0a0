"""Content-addressed cache of merged models, and atomic writes of explicit merge outputs.

Key
    ``sha256`` of a canonical JSON of: the merge-engine version and its arithmetic (the fused
    kernel, whose bytes are the same on every CPU, or the numpy/BLAS fallback, whose GEMM may round a
    few elements differently: see :mod:`peftdeploy.merge.kernels`); the backbone's content (SHA-256 of
    every weight shard *and* of every non-weight file that is copied into the output — config,
    tokenizer, chat template — since they are part of the result); for each adapter in order, the
    SHA-256 of ``adapter_config.json`` and of its weights file, and its weight; the output dtype
    and the shard size. Names (of adapters, of the recipe) and the caller's provenance dict are *not*
    part of the key: they do not change a byte of the weights. Identical content in another
    directory is the same key.

    Hashing real content is chosen over (size, mtime) fingerprints so that a key means the same
    bytes on every machine; its cost is paid once per file: :class:`HashCache` memoizes the digest
    of each file by (path, size, mtime_ns, inode) in ``<root>/.file-hashes.json``, so a second
    lookup costs a ``stat`` per file (well under a second), and files of a Hugging Face hub cache
    are not read at all (their blob name is their SHA-256).

Layout under the root (``$PEFTDEPLOY_CACHE/merged``, else ``$XDG_CACHE_HOME/peftdeploy/merged``,
else ``~/.cache/peftdeploy/merged``)::

    <key>/                      a complete merged model (+ .peftdeploy-complete, peftdeploy-provenance.json)
    <key>.lock                  filelock held while <key> is being produced
    .tmp-<key>-<pid>/           a merge in progress (or the remains of a killed one)
    .file-hashes.json           the hash memo

Atomicity: a merge writes into ``.tmp-<key>-<pid>/``, writes the completion marker last, and
``os.rename``\\ s the directory to ``<key>/``; a directory is a hit only if it has the marker with its
key, so a killed merge never looks complete. Its tmp dir is deleted by the next merge of any key
(a tmp dir whose key lock can be taken belongs to a dead process). Two processes merging the same
key serialize on ``<key>.lock``: the second waits, then finds the hit.

Explicit output (``output=``, a recipe's ``policy.merge.output``): the same protocol next to it —
``<parent>/.tmp-<key>-<pid>/`` renamed to ``output``, serialized on ``<parent>/.<name>.peftdeploy.lock``.
An existing ``output`` with the marker of the same key is a hit; an empty directory is replaced; a
peftdeploy output of another key is replaced only with ``overwrite=True``; anything else is
refused (MergeError), never touched.

Durability: files are not fsynced unless ``fsync=True`` (then every file, the marker and the
parent directory are, before and after the rename). Without it a *killed process* still never
leaves a complete-looking entry (the page cache survives it); a power loss might.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence


from peftdeploy.errors import MergeError
from peftdeploy.util import cache_root, marker_key, pid_alive, read_marker
from peftdeploy.merge.common import (COMPLETE_MARKER, DEFAULT_SHARD_SIZE, MERGE_ENGINE_VERSION, PROVENANCE_FILE,
                                     AdapterInput, MergeResult, backbone_fingerprint, dtype_name, sha256_json)
from peftdeploy.merge import manifest
from peftdeploy.merge.hashing import HashCache
from peftdeploy.merge.lora import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFETENSORS

HASH_MEMO = ".file-hashes.json"
_TMP_RE = re.compile(r"^\.tmp-(?P<key>[0-9a-f]{64})-(?P<pid>\d+)$")
_OLD_RE = re.compile(r"^\.old-(?P<key>[0-9a-f]{64})-(?P<pid>\d+)$")


def default_cache_root() -> Path:
    """$PEFTDEPLOY_CACHE/merged, else $XDG_CACHE_HOME/peftdeploy/merged, else ~/.cache/peftdeploy/merged."""
    return cache_root() / "merged"


def adapter_files(name: str, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(adapter_config.json, weights file) of a PEFT adapter directory; MergeError when it is not one."""
    p = Path(path)
    cfg = p / ADAPTER_CONFIG
    w = p / ADAPTER_SAFETENSORS
    if not w.is_file():
        w = p / ADAPTER_PICKLE
    if not cfg.is_file() or not w.is_file():
        raise MergeError(f"adapter {name!r}: {p} is not a PEFT adapter directory "
                         f"({ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS})",
                         fix="point the adapter at a directory saved with peft's save_pretrained")
    return cfg, w


def merge_key(backbone_dir: str | os.PathLike[str], adapters: Sequence[AdapterInput], *, dtype: Any = "auto",
              shard_size_bytes: int = DEFAULT_SHARD_SIZE, hash_cache: HashCache | None = None
              ) -> tuple[str, dict[str, Any]]:
    """(key, identity): the cache key of a merge and the JSON document it hashes."""
    hc = hash_cache or HashCache(None)
    od = dtype_name(dtype)
    ads = []
    for a in adapters:
        cfg, w = adapter_files(a.name, a.path)
        hs = hc.sha256_many([cfg, w], threads=1)
        ads.append({"config_sha256": hs[str(cfg)], "weights_sha256": hs[str(w)], "weights_file": w.name,
                    "weight": float(a.weight)})
    from peftdeploy.merge.kernels import kernel_id

    identity = {
        "engine": MERGE_ENGINE_VERSION,
        "kernel": kernel_id(),
        "backbone": backbone_fingerprint(backbone_dir, hc),
        "adapters": ads,
        "dtype": od or "auto",
        "shard_size_bytes": int(shard_size_bytes),
    }
    return sha256_json(identity), identity




def _hit(final: Path, key: str, t0: float, verify: bool | None = None) -> MergeResult | None:
    m = read_marker(final)
    if m.get("key") != key:
        return None
    problem = manifest.verify(final, m.get("files"), full=verify)
    if problem:
        manifest.report(final, problem)
        return None
    prov: dict[str, Any] = {}
    try:
        prov = json.loads((final / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        pass
    return MergeResult(path=final, cache_hit=True, key=key, seconds=time.perf_counter() - t0,
                       dtype=(prov.get("output") or {}).get("dtype"), provenance=prov)


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def _pid_dead(pid: int) -> bool:
    return not pid_alive(pid)


def cleanup_stale(root: str | os.PathLike[str], *, dead_only: bool = False) -> list[Path]:
    """Delete leftovers of killed merges under a cache root (tmp dirs whose key lock is free), or under
    an explicit output's parent (`dead_only`: tmp dirs whose writing process is gone)."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TMP_RE.match(p.name) or _OLD_RE.match(p.name)
        if not m:
            continue
        if _pid_dead(int(m["pid"])):
            _rmtree(p)
            removed.append(p)
            continue
        if dead_only:
            continue
        from filelock import FileLock, Timeout  # imported here: ~25 ms that merge_model's callers need not pay

        lock = FileLock(str(root / f"{m['key']}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a merge of that key is running
        try:
            _rmtree(p)
            removed.append(p)
        finally:
            lock.release()
    return removed


def lookup_cached(backbone_dir: str | os.PathLike[str], adapters: Sequence[AdapterInput], *, dtype: Any = "auto",
                  output: str | os.PathLike[str] | None = None, cache_root: str | os.PathLike[str] | None = None,
                  shard_size_bytes: int = DEFAULT_SHARD_SIZE, verify: bool | None = None) -> MergeResult | None:
    """The cached/previous result of this merge if there is one and it verifies (never merges)."""
    t0 = time.perf_counter()
    root = Path(cache_root) if cache_root else default_cache_root()
    hc = HashCache(root / HASH_MEMO)
    key, _ = merge_key(backbone_dir, adapters, dtype=dtype, shard_size_bytes=shard_size_bytes, hash_cache=hc)
    if root.is_dir():
        hc.save()
    final = Path(output).absolute() if output is not None else root / key
    return _hit(final, key, t0, verify)


def merge_cached(
    backbone_dir: str | os.PathLike[str],
    adapters: Sequence[AdapterInput],
    *,
    dtype: Any = "auto",
    output: str | os.PathLike[str] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    threads: int | None = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    fsync: bool = False,
    lock_timeout: float = -1,
    verify: bool | None = None,
) -> MergeResult:
    """Merge (or find the previous merge of) these adapters into this backbone.

    Without `output`, the result lives in the cache at ``<root>/<key>/``. With `output` (a
    recipe's ``policy.merge.output``), the merge is written next to it and renamed into place; an
    existing `output` is reused when it is a previous peftdeploy output of the same key, replaced
    when it is empty or (with ``overwrite=True``) a peftdeploy output of another key, and never
    touched otherwise (MergeError). `lock_timeout`: seconds to wait for a concurrent merge of the
    same key (-1: forever). `verify`: hash every file of a hit (default: only files whose size or
    mtime changed; ``PEFTDEPLOY_VERIFY_CACHE=1``); a hit that fails verification is merged again.
    """
    t0 = time.perf_counter()
    root = (Path(cache_root) if cache_root else default_cache_root()).absolute()
    root.mkdir(parents=True, exist_ok=True)
    hc = HashCache(root / HASH_MEMO)
    key, identity = merge_key(backbone_dir, adapters, dtype=dtype, shard_size_bytes=shard_size_bytes,
                              hash_cache=hc)
    hc.save()
    t_key = time.perf_counter() - t0

    if output is None:
        final = root / key
        parent = root
        lock_path = root / f"{key}.lock"
    else:
        final = Path(output).expanduser().absolute()
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        lock_path = parent / f".{final.name}.peftdeploy.lock"

    hit = _hit(final, key, t0, verify)
    if hit:
        return hit

    def _check_output() -> bool:
        """True if `final` must be moved aside before the rename."""
        if not final.exists() and not final.is_symlink():
            return False
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            return True
        if output is None:  # an incomplete/foreign <root>/<key> inside our own cache: replace it
            return True
        prev = marker_key(final)
        if prev is None:
            raise MergeError(f"merge output {final} exists and is not a peftdeploy merge output",
                             fix="choose another output directory, or remove it")
        if output is not None and not overwrite and prev != key:  # same key: a damaged copy, rebuilt
            raise MergeError(f"merge output {final} holds a different merge (key {prev[:12]}…)",
                             fix="remove it, choose another output directory, or allow overwriting")
        return True

    from filelock import FileLock, Timeout

    try:
        lock = FileLock(str(lock_path), timeout=lock_timeout)
        lock.acquire()
    except Timeout:
        raise MergeError(f"timed out after {lock_timeout}s waiting for another merge of {final}",
                         fix="wait for the other merge to finish, or remove a stale lock file "
                             f"{lock_path} if no merge is running") from None
    try:
        hit = _hit(final, key, t0, verify)  # another process may have merged it while we waited
        if hit:
            return hit
        # leftovers of killed merges of this key (any live merge of it would hold the lock)
        for p in parent.iterdir():
            m = _TMP_RE.match(p.name) or _OLD_RE.match(p.name)
            if m and m["key"] == key:
                _rmtree(p)
        move_aside = _check_output()
        tmp = parent / f".tmp-{key}-{os.getpid()}"
        from peftdeploy.merge.engine import merge_model  # torch: only when there is something to merge

        digests: dict[str, str] = {}  # shards hashed while they were written
        res = merge_model(backbone_dir, adapters, tmp, dtype=dtype, shard_size_bytes=shard_size_bytes,
                          threads=threads, progress=progress, provenance=provenance, allow_pickle=allow_pickle,
                          hash_cache=hc, fsync=fsync, digests=digests,
                          _extra_provenance={"cache_key": key, "identity": identity,
                                             "key_seconds": round(t_key, 4)})
        marker = {"key": key, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "merge_engine_version": MERGE_ENGINE_VERSION,
                  "files": manifest.build(tmp, skip=COMPLETE_MARKER, known=digests)}
        mp = tmp / COMPLETE_MARKER
        mp.write_text(json.dumps(marker) + "\n")
        if fsync:
            for p in (mp, tmp):
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        old = None
        if move_aside:
            _check_output()  # re-check under the lock right before touching it
            if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
                final.rmdir()
            else:
                old = parent / f".old-{key}-{os.getpid()}"
                os.rename(final, old)
        os.rename(tmp, final)
        if fsync:
            fd = os.open(parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if old is not None:
            _rmtree(old)
    except BaseException:
        tmp_dir = parent / f".tmp-{key}-{os.getpid()}"
        if tmp_dir.exists():
            _rmtree(tmp_dir)
        raise
    finally:
        lock.release()
    cleanup_stale(root)
    if output is not None:
        cleanup_stale(parent, dead_only=True)  # killed merges of other keys next to the output
    return MergeResult(path=final, cache_hit=False, key=key, seconds=time.perf_counter() - t0, dtype=res.dtype,
                       provenance=res.provenance)
