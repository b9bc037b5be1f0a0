"""vLLM 0.26.0's Python sources for tests, from the GPU site shipped in ``../shared/gpu`` (two xz parts).

vLLM 0.26 installs only on the GPU machine (CPython 3.12, CUDA 13), but its pure-Python modules import
here; `tree()` extracts the ``.py`` files of ``vllm/`` once into the peftdeploy cache (atomic rename) and
returns that directory (its ``vllm/`` package inside), or None where ``../shared/gpu`` is absent.
``PEFTDEPLOY_VLLM026_SRC`` names an already extracted ``vllm/`` directory instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT.parent / "shared" / "gpu"
PARTS = [GPU / "vllm026_site.tar.xz.part00", GPU / "vllm026_site.tar.xz.part01"]


class _Joined:
    """The two parts read as one stream (no 83 MB temporary file)."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]

    def read(self, n: int = -1) -> bytes:
        out = b""
        while self._files and (n < 0 or len(out) < n):
            chunk = self._files[0].read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._files.pop(0).close()
                continue
            out += chunk
        return out


def tree() -> Path | None:
    src = os.environ.get("PEFTDEPLOY_VLLM026_SRC")
    if src:
        return Path(src).parent if (Path(src) / "__init__.py").is_file() else None
    if not all(p.exists() for p in PARTS):
        return None
    key = hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() for p in PARTS)).hexdigest()[:16]
    cache = Path(os.environ.get("PEFTDEPLOY_CACHE", Path.home() / ".cache" / "peftdeploy")) / f"test-vllm026-py-{key}"
    if (cache / "vllm" / "__init__.py").exists():
        return cache
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=_Joined(PARTS), mode="r|xz") as tf:
        for m in tf:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and name.startswith("vllm/") and name.endswith(".py"):
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                f = tf.extractfile(m)
                assert f is not None
                dest.write_bytes(f.read())
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache
