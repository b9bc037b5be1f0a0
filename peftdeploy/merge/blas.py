"""numpy's bundled OpenBLAS for the merge's small GEMMs (``C += coef·A@B`` with no temporary, on the
calling thread), found in the process's mapped libraries and self-tested at first use; numpy
otherwise."""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any, Iterator

import numpy as np

# numpy's matmul cannot accumulate into its output (C += A @ B) and lets OpenBLAS spawn threads for
# these small GEMMs; numpy's bundled OpenBLAS (ILP64, symbol suffix 64_) exports cblas_sgemm, which
# does both for us: called through ctypes (which releases the GIL), with a self-test at first use,
# and np.matmul + np.add whenever it is not there.
_BLAS: dict[str, Any] = {}


def _openblas_libs() -> list[ctypes.CDLL]:
    libs = []
    try:
        paths = set()
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.rsplit(None, 1)[-1]
                if p.startswith("/") and "openblas" in os.path.basename(p).lower():
                    paths.add(p)
        for p in sorted(paths):
            libs.append(ctypes.CDLL(p))
    except (OSError, ValueError):
        pass
    return libs


def _blas_init() -> dict[str, Any]:
    if _BLAS:
        return _BLAS
    threads = sgemm = None
    for lib in _openblas_libs():
        for g, s_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                      ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                      ("openblas_get_num_threads", "openblas_set_num_threads")):
            if threads is None and hasattr(lib, g) and hasattr(lib, s_):
                get, set_ = getattr(lib, g), getattr(lib, s_)
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                threads = (get, set_)
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):  # 64-bit integer interface only
            if sgemm is None and hasattr(lib, name):
                f = getattr(lib, name)
                i64, fl, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
                f.restype = None
                f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, fl, vp, i64, vp, i64, fl,
                              vp, i64]
                if _sgemm_selftest(f):
                    sgemm = f
    _BLAS.update(threads=threads, sgemm=sgemm)
    return _BLAS


def _sgemm_selftest(f: Any) -> bool:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3), dtype=np.float32)
    b = rng.standard_normal((3, 7), dtype=np.float32)
    c = rng.standard_normal((5, 7), dtype=np.float32)
    want = c + np.float32(0.5) * (a @ b)
    try:
        f(101, 111, 111, 5, 7, 3, 0.5, a.ctypes.data, 3, b.ctypes.data, 7, 1.0, c.ctypes.data, 7)
    except Exception:  # noqa: BLE001 - any ctypes trouble: use numpy
        return False
    return bool(np.allclose(c, want, rtol=1e-5, atol=1e-6))


def addmm(c: np.ndarray, left: np.ndarray, right: np.ndarray, coef: float, d: np.ndarray) -> None:
    """c += coef · left @ right (float32, C-contiguous); d: scratch of c's shape."""
    sgemm = (_BLAS or _blas_init())["sgemm"]
    if sgemm is not None:
        m, k = left.shape
        n = right.shape[1]
        sgemm(101, 111, 111, m, n, k, coef, left.ctypes.data, k, right.ctypes.data, n, 1.0, c.ctypes.data, n)
        return
    np.matmul(left, right, out=d)
    if coef != 1.0:
        np.multiply(d, np.float32(coef), out=d)
    np.add(c, d, out=c)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Rank-r GEMMs on row chunks are far too small for BLAS threads (they would spin on the cores
    the writer and the hasher need): run them on the calling thread."""
    f = _blas_init()["threads"]
    if f is None:
        yield
        return
    get, set_ = f
    prev = get()
    set_(1)
    try:
        yield
    finally:
        set_(prev)


