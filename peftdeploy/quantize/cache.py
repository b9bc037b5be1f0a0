"""Content-addressed cache of quantized checkpoints (same conventions as ``peftdeploy.merge.cache``).

Key: ``sha256`` of a canonical JSON of the quantizer version, the method (``rtn``), the scheme and
its requested parameters (group size), and the identity of the source model: the merge cache key
when the source is a peftdeploy merge output (its ``.peftdeploy-complete`` marker names the key —
the merge key already hashes backbone + adapters + dtype), else the content fingerprint of the
directory (SHA-256 of every weight shard and copied file, memoized like the merge cache).

Layout: ``$PEFTDEPLOY_CACHE/quantized`` (else ``$XDG_CACHE_HOME/peftdeploy/quantized``, else
``~/.cache/peftdeploy/quantized``)::

    <key>/              complete checkpoint (+ .peftdeploy-complete, peftdeploy-quantization.json)
    <key>.lock          held while <key> is produced
    .tmp-<key>-<pid>/   in progress (removed on failure / by the next run)
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from peftdeploy.errors import MergeError
from peftdeploy.util import cache_root
from peftdeploy.quantize.rtn import QUANTIZER_VERSION, QuantizeResult, canonical_scheme, quantize_model

COMPLETE_MARKER = ".peftdeploy-complete"
HASH_MEMO = ".file-hashes.json"


def default_quant_cache_root() -> Path:
    """$PEFTDEPLOY_CACHE/quantized, else $XDG_CACHE_HOME/peftdeploy/quantized, else ~/.cache/peftdeploy/quantized."""
    return cache_root() / "quantized"


def _marker_key(d: Path) -> str | None:
    try:
        return json.loads((d / COMPLETE_MARKER).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _verified(d: Path, key: str) -> bool:
    """`d` is a complete entry of `key` whose files match its manifest (peftdeploy.merge.manifest)."""
    from peftdeploy.merge import manifest

    if _marker_key(d) != key:
        return False
    problem = manifest.verify(d, json.loads((d / COMPLETE_MARKER).read_text()).get("files"))
    if problem:
        manifest.report(d, problem)
    return problem is None


def source_identity(src_dir: str | os.PathLike[str], cache_root: Path | None = None) -> dict[str, Any]:
    src = Path(src_dir)
    mk = _marker_key(src)
    if mk:
        return {"merged_key": mk}
    try:
        from peftdeploy.merge.common import backbone_fingerprint
    except ImportError:  # older layout
        from peftdeploy.merge.engine import backbone_fingerprint  # type: ignore[no-redef]
    from peftdeploy.merge.hashing import HashCache

    hc = HashCache((cache_root / HASH_MEMO) if cache_root else None)
    fp = backbone_fingerprint(src, hc)
    if cache_root:
        try:
            hc.save()
        except OSError:
            pass
    return {"fingerprint": fp}


def quant_key(src_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128, method: str = "rtn",
              cache_root: Path | None = None) -> tuple[str, dict[str, Any]]:
    s = canonical_scheme(scheme)
    identity = {"quantizer": QUANTIZER_VERSION, "method": method, "scheme": s,
                "group_size": int(group_size) if s == "w4a16" else None,
                "source": source_identity(src_dir, cache_root)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return key, identity


@dataclass
class QuantizedCheckpoint:
    path: Path
    cache_hit: bool
    key: str
    scheme: str
    seconds: float
    result: QuantizeResult | None = None  # None on a cache hit

    @property
    def provenance(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "peftdeploy-quantization.json").read_text())
        except (OSError, ValueError):
            return {}


def lookup_quantized(src_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128,
                     cache_root: str | os.PathLike[str] | None = None) -> Path | None:
    root = Path(cache_root) if cache_root else default_quant_cache_root()
    key, _ = quant_key(src_dir, scheme, group_size=group_size, cache_root=root if root.is_dir() else None)
    d = root / key
    return d if _verified(d, key) else None


def quantize_cached_result(
    src_dir: str | os.PathLike[str],
    scheme: str,
    *,
    group_size: int = 128,
    method: str = "rtn",
    cache_root: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    lock_timeout: float = -1,
) -> QuantizedCheckpoint:
    t0 = time.perf_counter()
    root = (Path(cache_root) if cache_root else default_quant_cache_root()).absolute()
    root.mkdir(parents=True, exist_ok=True)
    key, identity = quant_key(src_dir, scheme, group_size=group_size, method=method, cache_root=root)
    final = root / key
    s = canonical_scheme(scheme)
    if _verified(final, key):
        return QuantizedCheckpoint(final, True, key, s, time.perf_counter() - t0)
    try:
        lock = FileLock(str(root / f"{key}.lock"), timeout=lock_timeout)
        lock.acquire()
    except Timeout:
        raise MergeError(f"timed out after {lock_timeout}s waiting for another quantization of {final}",
                         fix=f"wait for it, or remove a stale {root / (key + '.lock')}") from None
    try:
        if _verified(final, key):
            return QuantizedCheckpoint(final, True, key, s, time.perf_counter() - t0)
        for p in root.iterdir():
            if p.name.startswith(f".tmp-{key}-"):
                shutil.rmtree(p, ignore_errors=True)
        if final.exists():  # incomplete leftover without a valid marker
            shutil.rmtree(final, ignore_errors=True)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        from peftdeploy.merge import manifest

        try:
            res = quantize_model(src_dir, tmp, s, group_size=group_size, method=method, progress=progress,
                                 provenance={"cache_key": key, "identity": identity})
            (tmp / COMPLETE_MARKER).write_text(json.dumps(
                {"key": key, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "quantizer_version": QUANTIZER_VERSION,
                 "files": manifest.build(tmp, skip=COMPLETE_MARKER)}) + "\n")
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MergeError(f"the disk under {root} filled up while writing the {s} checkpoint ({e.strerror}); "
                                 "nothing was kept", fix="free space there (about the merged model's size), or "
                                 "point PEFTDEPLOY_CACHE at a larger disk") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        res.path = final
        res.key = key
        return QuantizedCheckpoint(final, False, key, s, time.perf_counter() - t0, res)
    finally:
        lock.release()


def quantize_cached(merged_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128,
                    method: str = "rtn", cache_root: str | os.PathLike[str] | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """The compressed-tensors checkpoint of `merged_dir` quantized with `scheme` (int8 | w8a16 |
    w4a16), from the cache or produced now. Serve it with ``vllm serve <path>`` (no --quantization:
    vLLM reads config.json's quantization_config)."""
    return quantize_cached_result(merged_dir, scheme, group_size=group_size, method=method,
                                  cache_root=cache_root, progress=progress).path
