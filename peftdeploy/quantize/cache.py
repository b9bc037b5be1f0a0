"""Content-addressed cache of quantized checkpoints (same conventions as ``peftdeploy.merge.cache``).

Key: ``sha256`` of a canonical JSON of the quantizer version, the method (``rtn``, ``gptq``, ``awq``),
the scheme and its requested parameters (group size), for llm-compressor methods the tool version
and the calibration set (dataset name, its sha256, samples, seq_len), and the identity of the source model: the merge cache key
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
from peftdeploy.util import COMPLETE_MARKER, cache_root, marker_key
from peftdeploy.quantize.calibration import CalibrationSet, load_calibration
from peftdeploy.quantize.methods import CALIBRATED
from peftdeploy.quantize.rtn import QUANTIZER_VERSION, QuantizeResult, canonical_scheme, quantize_model

HASH_MEMO = ".file-hashes.json"


def default_quant_cache_root() -> Path:
    """$PEFTDEPLOY_CACHE/quantized, else $XDG_CACHE_HOME/peftdeploy/quantized, else ~/.cache/peftdeploy/quantized."""
    return cache_root() / "quantized"




def _verified(d: Path, key: str) -> bool:
    """`d` is a complete entry of `key` whose files match its manifest (peftdeploy.merge.manifest)."""
    from peftdeploy.merge import manifest

    if marker_key(d) != key:
        return False
    problem = manifest.verify(d, json.loads((d / COMPLETE_MARKER).read_text()).get("files"))
    if problem:
        manifest.report(d, problem)
    return problem is None


def source_identity(src_dir: str | os.PathLike[str], cache_root: Path | None = None) -> dict[str, Any]:
    src = Path(src_dir)
    mk = marker_key(src)
    if mk:
        return {"merged_key": mk}
    from peftdeploy.merge.common import backbone_fingerprint
    from peftdeploy.merge.hashing import HashCache

    hc = HashCache((cache_root / HASH_MEMO) if cache_root else None)
    fp = backbone_fingerprint(src, hc)
    if cache_root:
        try:
            hc.save()
        except OSError:
            pass
    return {"fingerprint": fp}


def _canon(scheme: str) -> str:
    """Offline schemes of the cache: rtn.py's (int8, w8a16, w4a16) and fp8 (llm-compressor FP8_DYNAMIC)."""
    return "fp8" if str(scheme).lower() in ("fp8", "fp8_dynamic") else canonical_scheme(scheme)


def quant_key(src_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128, method: str = "rtn",
              cache_root: Path | None = None, calibration: CalibrationSet | None = None) -> tuple[str, dict[str, Any]]:
    """(key, identity). rtn keeps the identity it always had (existing entries stay hits); an
    llm-compressor method adds the tool version and, when calibrated, the calibration set."""
    s = _canon(scheme)
    identity: dict[str, Any] = {"quantizer": QUANTIZER_VERSION, "method": method, "scheme": s,
                                "group_size": int(group_size) if s == "w4a16" else None,
                                "source": source_identity(src_dir, cache_root)}
    if method != "rtn" or s == "fp8":
        from peftdeploy.quantize.llmc import TOOL_VERSION

        identity["tool"] = TOOL_VERSION
        if s == "int8" and method == "gptq":  # its settings are tuned (measured sweep): a change is a new key
            from peftdeploy.quantize.llmc_worker import INT8_GPTQ

            identity["int8_gptq"] = dict(INT8_GPTQ)
        if method in CALIBRATED:
            if calibration is None:
                calibration = load_calibration()
            identity["calibration"] = calibration.identity
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


def lookup_quantized(src_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128, method: str = "rtn",
                     cache_root: str | os.PathLike[str] | None = None,
                     calibration: CalibrationSet | None = None) -> Path | None:
    root = Path(cache_root) if cache_root else default_quant_cache_root()
    key, _ = quant_key(src_dir, scheme, group_size=group_size, method=method, calibration=calibration,
                       cache_root=root if root.is_dir() else None)
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
    calibration: CalibrationSet | None = None,
    timeout: float | None = None,
) -> QuantizedCheckpoint:
    """The checkpoint of `src_dir` quantized with (`scheme`, `method`), from the cache or made now:
    rtn with peftdeploy's streaming quantizer, gptq / awq (and fp8) with llm-compressor in its tool
    venv (`calibration`: the set calibrated methods see; None = the shipped default)."""
    if method in CALIBRATED and calibration is None:
        calibration = load_calibration()
    t0 = time.perf_counter()
    root = (Path(cache_root) if cache_root else default_quant_cache_root()).absolute()
    root.mkdir(parents=True, exist_ok=True)
    key, identity = quant_key(src_dir, scheme, group_size=group_size, method=method, cache_root=root,
                              calibration=calibration)
    final = root / key
    s = _canon(scheme)
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
            res: QuantizeResult | None = None
            if method == "rtn" and s != "fp8":
                res = quantize_model(src_dir, tmp, s, group_size=group_size, method=method, progress=progress,
                                     provenance={"cache_key": key, "identity": identity})
            else:
                from peftdeploy.quantize.llmc import quantize_llmc

                quantize_llmc(src_dir, tmp, s, method, calibration=calibration, group_size=group_size,
                              progress=progress, timeout=timeout, provenance={"cache_key": key, "identity": identity})
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
        if res is not None:
            res.path = final
            res.key = key
        return QuantizedCheckpoint(final, False, key, s, time.perf_counter() - t0, res)
    finally:
        lock.release()


def quantize_cached(merged_dir: str | os.PathLike[str], scheme: str, *, group_size: int = 128,
                    method: str = "rtn", cache_root: str | os.PathLike[str] | None = None,
                    progress: Callable[[str], None] | None = None, calibration: CalibrationSet | None = None) -> Path:
    """The compressed-tensors checkpoint of `merged_dir` quantized with `scheme` (int8 | w8a16 |
    w4a16), from the cache or produced now. Serve it with ``vllm serve <path>`` (no --quantization:
    vLLM reads config.json's quantization_config)."""
    return quantize_cached_result(merged_dir, scheme, group_size=group_size, method=method,
                                  cache_root=cache_root, progress=progress, calibration=calibration).path
