"""ctypes binding of the fused merge kernel (``_kernels.c``).

The kernel computes ``out = round(W + Σ coef_f · L_f @ R_f)`` for a range of a weight's elements
in one pass (float32 arithmetic in registers, one rounding to the output dtype), reading ``W``
either from memory or straight from the backbone file with ``pread``. It is built by ``pip
install`` as the optional extension ``peftdeploy.merge._kernels`` and called through ctypes, which
drops the GIL: several threads merge different ranges of one tensor at once.

``load()`` returns None (the engine then uses its numpy path) when the extension is not built,
was built from another version of the source (older than ``_kernels.c`` in a source checkout, or
another ABI), fails its self-test, or ``PEFTDEPLOY_MERGE_KERNEL`` is ``numpy``. The self-test compares the kernel bit for bit with :func:`reference`, numpy doing
the same IEEE operations in the same order; the kernel is compiled without fused multiply-adds,
so its results do not depend on the CPU's vector width or on how a tensor is cut into ranges.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Sequence

import numpy as np

from peftdeploy.safetensors_format import DTYPE_BYTES

__all__ = ["Kernel", "Factors", "load", "kernel_id", "reference", "KERNEL_ENV", "CODES"]

KERNEL_ENV = "PEFTDEPLOY_MERGE_KERNEL"  # "numpy": do not use the compiled kernel
CODES = {"BF16": 0, "F16": 1, "F32": 2}
ITEMSIZE = {k: int(DTYPE_BYTES[k]) for k in CODES}
ABI = 1  # PD_ABI in _kernels.c
ARITH = 1  # bump when the kernel's arithmetic (and so its output bytes) changes


class _Factor(ctypes.Structure):
    _fields_ = [("L", ctypes.c_void_p), ("R", ctypes.c_void_p), ("r", ctypes.c_int64), ("coef", ctypes.c_float)]


class Factors:
    """The low-rank terms of one weight: (L (rows × r), R (r × cols), coef) as float32, C-contiguous.

    Keeps the arrays alive as long as the ctypes structs that point into them."""

    def __init__(self, terms: Sequence[tuple[np.ndarray, np.ndarray, float]], rows: int, cols: int):
        if not terms:
            raise ValueError("no low-rank terms")
        self.arrays = []
        self.c = (_Factor * len(terms))()
        for i, (left, right, coef) in enumerate(terms):
            left = np.ascontiguousarray(left, dtype=np.float32)
            right = np.ascontiguousarray(right, dtype=np.float32)
            r = left.shape[1] if left.ndim == 2 else -1
            if left.shape != (rows, r) or right.shape != (r, cols) or r < 1:
                raise ValueError(f"factor shapes {left.shape} @ {right.shape} do not make {rows}x{cols}")
            self.arrays += [left, right]
            self.c[i] = _Factor(left.ctypes.data, right.ctypes.data, r, float(coef))
        self.n = len(terms)
        self.rows, self.cols = rows, cols


class Kernel:
    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._span = lib.pd_merge_span
        self._span.restype = ci
        self._span.argtypes = [vp, ci, vp, ci, i64, i64, i64, i64, ci, vp]
        self._fd = lib.pd_merge_fd
        self._fd.restype = ci
        self._fd.argtypes = [ci, i64, ci, vp, ci, i64, i64, i64, i64, ci, vp, vp, i64]
        lib.pd_have_f16.restype = ci
        self.codes = {k for k in CODES if k != "F16" or lib.pd_have_f16()}
        self._local = threading.local()

    def supports(self, src_code: str, out_code: str) -> bool:
        return src_code in self.codes and out_code in self.codes

    @staticmethod
    def _check_out(out: np.ndarray, oc: str, e0: int, e1: int) -> None:
        if not (out.flags.c_contiguous and out.flags.writeable) or out.nbytes < (e1 - e0) * ITEMSIZE[oc]:
            raise ValueError(f"output buffer of {out.nbytes} B for {e1 - e0} {oc} elements")

    def merge_span(self, W: np.ndarray, sc: str, out: np.ndarray, oc: str, f: Factors, e0: int, e1: int) -> None:
        """Elements [e0, e1) of the flattened weight: W holds (at least) those elements in its
        storage dtype, starting with e0; out receives them in the output dtype."""
        if not 0 <= e0 <= e1 <= f.rows * f.cols:
            raise ValueError(f"range [{e0}, {e1}) outside a {f.rows}x{f.cols} weight")
        if not W.flags.c_contiguous or W.nbytes < (e1 - e0) * ITEMSIZE[sc]:
            raise ValueError(f"weight buffer of {W.nbytes} B for {e1 - e0} {sc} elements")
        self._check_out(out, oc, e0, e1)
        rc = self._span(W.ctypes.data, CODES[sc], out.ctypes.data, CODES[oc], f.rows, f.cols, e0, e1, f.n, f.c)
        if rc:
            raise OSError(-rc, f"merge kernel: {os.strerror(-rc)}")

    def merge_fd(self, fd: int, data_offset: int, sc: str, out: np.ndarray, oc: str, f: Factors, e0: int,
                 e1: int, scratch_bytes: int = 256 << 10) -> None:
        """The same, reading the weight (which starts at byte `data_offset` of `fd`) with pread in
        cache-sized pieces into a scratch buffer of the calling thread."""
        if not 0 <= e0 <= e1 <= f.rows * f.cols:
            raise ValueError(f"range [{e0}, {e1}) outside a {f.rows}x{f.cols} weight")
        self._check_out(out, oc, e0, e1)
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.nbytes < scratch_bytes:
            scratch = self._local.scratch = np.empty(scratch_bytes, np.uint8)
        rc = self._fd(fd, data_offset, CODES[sc], out.ctypes.data, CODES[oc], f.rows, f.cols, e0, e1, f.n, f.c,
                      scratch.ctypes.data, scratch.nbytes)
        if rc:
            raise OSError(-rc, f"merge kernel: {os.strerror(-rc)}")


# -- reference and self-test ---------------------------------------------------------------------
def _to_f32(code: str, a: np.ndarray) -> np.ndarray:
    if code == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _from_f32(code: str, x: np.ndarray) -> np.ndarray:
    if code == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        h = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        h[np.isnan(x)] = 0x7FC0
        return h
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16 if code == "F16" else np.float32)


def reference(W: np.ndarray, sc: str, oc: str, terms: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """What the kernel computes, in numpy, with the same float32 operations in the same order
    (d = 0; d = d + l_k * r_k over k; acc = w + coef * d per term; one rounding). Slow; for tests."""
    rows, cols = W.shape
    acc = _to_f32(sc, W).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for left, right, coef in terms:
            left = np.asarray(left, np.float32)
            right = np.asarray(right, np.float32)
            d = np.zeros((rows, cols), np.float32)
            for k in range(left.shape[1]):
                d = d + left[:, k:k + 1] * right[k:k + 1, :]
            acc = acc + np.float32(coef) * d
    return _from_f32(oc, acc)


def _storage(code: str, x: np.ndarray) -> np.ndarray:
    return _from_f32(code, x.astype(np.float32))


def _selftest(k: Kernel) -> bool:
    rng = np.random.default_rng(1234)
    for rows, cols, sc, oc, ranks in ((9, 70, "BF16", "BF16", (3,)), (6, 33, "F32", "BF16", (2, 5)),
                                      (5, 64, "BF16", "F32", (16,)), (7, 40, "F16", "F16", (4,))):
        if not k.supports(sc, oc):
            continue
        W = _storage(sc, rng.standard_normal((rows, cols)))
        if sc != "F16":
            W.reshape(-1)[3] = _storage(sc, np.array([np.nan]))[0]
        terms = [(rng.standard_normal((rows, r)).astype(np.float32), rng.standard_normal((r, cols)).astype(np.float32),
                  0.5 + i) for i, r in enumerate(ranks)]
        want = reference(W, sc, oc, terms)
        f = Factors(terms, rows, cols)
        got = np.empty_like(want)
        cut = cols + 7  # a range that starts mid-row
        try:
            k.merge_span(W.reshape(-1), sc, got.reshape(-1), oc, f, 0, cut)
            k.merge_span(W.reshape(-1)[cut:], sc, got.reshape(-1)[cut:], oc, f, cut, rows * cols)
        except (OSError, ValueError):
            return False
        if got.tobytes() != want.tobytes():
            return False
    return True


_LOADED: list[Kernel | None] = []
_LOCK = threading.Lock()


def load() -> Kernel | None:
    """The compiled kernel, or None (see the module docstring). Cached per process."""
    if os.environ.get(KERNEL_ENV, "").strip().lower() == "numpy":
        return None
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def kernel_id() -> str:
    """Which arithmetic a merge on this machine uses, for cache keys and provenance: the fused
    kernel writes the same bytes on every CPU; the numpy fallback's GEMM (OpenBLAS, picked per
    CPU) may round a few elements differently."""
    return f"fused-{ARITH}" if load() is not None else "numpy-blas"


def _load() -> Kernel | None:
    try:
        from peftdeploy.merge import _kernels  # type: ignore[attr-defined]

        path = _kernels.__file__
        src = os.path.join(os.path.dirname(__file__), "_kernels.c")
        if os.path.exists(src) and os.path.getmtime(src) > os.path.getmtime(path):  # a source checkout
            import warnings

            warnings.warn(f"{path} is older than {src}: merging with the numpy fallback; rebuild the "
                          "kernel with `pip install -e .` (scripts/setup.sh)", RuntimeWarning, stacklevel=3)
            return None
        lib = ctypes.CDLL(path)
        lib.pd_abi.restype = ctypes.c_int
        if lib.pd_abi() != ABI:
            return None
        k = Kernel(lib, path)
    except (ImportError, OSError, AttributeError):
        return None
    return k if _selftest(k) else None
