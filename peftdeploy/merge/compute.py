"""The merge's arithmetic per tensor: the fused C kernel's driver (`_fused`, `_write_fused`), the
numpy path in float32 row chunks (`_compute`: exact bf16/f16 <-> f32 conversions, ``C += coef·B@A``
through `blas.addmm`) and the torch path for DoRA, pickled adapters and other dtypes
(`_compute_torch`). The engine (engine.py) calls them in order and writes what they return."""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from peftdeploy.errors import MergeError
from peftdeploy.merge import kernels, shard_read, shard_write
from peftdeploy.merge.blas import addmm as _addmm
from peftdeploy.merge.common import Backbone
from peftdeploy.merge.layout import TensorPlan, _values_equal
from peftdeploy.merge.lora import LoraAdapter

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 512 << 10  # float32 working set per row chunk of an adapted weight (two of them fit in L2)
FAST = {"BF16", "F16", "F32"}  # dtypes the numpy kernels load and store (others: torch fallback)


def _torch():  # noqa: ANN202 - torch is only needed for DoRA, pickled adapters and exotic dtypes
    import torch

    return torch


class _BufferPool:
    """Reusable uint8 buffers for tensors in flight: fresh multi-MB allocations are mmap'd and
    page-faulted each time, which costs as much as the merge arithmetic itself."""

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fit = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fit:
                return self._free.pop(min(fit, key=lambda i: self._free[i].size))
        return np.empty(max(nbytes, 1), dtype=np.uint8)

    def put(self, buf: np.ndarray | None) -> None:
        if buf is None:
            return
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:  # drop the smallest
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].size))


class _Ctx:
    def __init__(self, backbone: Backbone, adapters: Sequence[LoraAdapter], weights: Sequence[float], keep: int):
        self.adapters = adapters
        self.weights = weights
        self.fds = {f: os.open(f, os.O_RDONLY) for f in backbone.files}
        if hasattr(os, "posix_fadvise"):  # we read each shard front to back: ask for big readahead
            for fd in self.fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.pool = _BufferPool(keep)
        self._local = threading.local()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def workspace(self, numel: int) -> tuple[np.ndarray, np.ndarray]:
        """Two float32 scratch arrays of this thread (the chunk, and the chunk's delta)."""
        ws = getattr(self._local, "ws", None)
        if ws is None or ws[0].size < numel:
            ws = self._local.ws = (np.empty(numel, np.float32), np.empty(numel, np.float32))
        return ws[0][:numel], ws[1][:numel]

    def lora(self, ai: int, key: str) -> np.ndarray:
        """An adapter tensor as float32 (numpy), checked finite."""
        t = self.adapters[ai].array(key)
        if not np.isfinite(t).all():
            raise MergeError(f"adapter {self.adapters[ai].name!r}: {key} holds NaN/inf values",
                             fix="the adapter is broken; re-train or re-export it")
        return t

    def lora_t(self, ai: int, key: str) -> "torch.Tensor":
        return _torch().from_numpy(self.lora(ai, key))


@dataclass
class _Prepared:
    """The bytes of a tensor ready to be written, and the pooled buffers to give back once it is."""

    data: memoryview
    buffers: list[np.ndarray]


# -- numpy kernels: float32 chunk <-> storage dtype --------------------------------------------
def _load_f32(code: str, src: np.ndarray, dst: np.ndarray) -> None:
    """dst (float32) = src (storage dtype of `code`), exactly."""
    if code == "BF16":  # bf16 bits are the top half of the float32 bits
        np.left_shift(src, 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(dst, src, casting="unsafe")


def _store_f32(code: str, src: np.ndarray, dst: np.ndarray, tmp: np.ndarray) -> None:
    """dst (storage dtype of `code`) = src (float32) rounded to nearest even, as torch casts.
    Clobbers src and tmp (a uint32 array of src's shape)."""
    if code != "BF16":
        with np.errstate(over="ignore", invalid="ignore"):  # out of float16 range -> inf, as torch
            np.copyto(dst, src, casting="unsafe")  # f32 copy / f32->f16 (IEEE round to nearest even)
        return
    # NaNs whose payload sits in the low 16 bits would round to inf below: find them (rare) first
    nan = np.isnan(src) if np.isnan(np.maximum.reduce(src, axis=None)) else None
    u = src.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(u, 0x7FFF, out=u)
    np.add(u, tmp, out=u)
    np.right_shift(u, 16, out=u)
    np.copyto(dst, u, casting="unsafe")
    if nan is not None and nan.any():
        dst[nan] = 0x7FC0


def _merge_rows(W: np.ndarray, wc: str, out: np.ndarray, oc: str,
                factors: list[tuple[np.ndarray, np.ndarray, float]], ctx: _Ctx) -> None:
    """out = W + Σ coef · left @ right, in float32, in row chunks that stay in cache; one rounding to `oc`.

    W and out may be the same buffer (same dtype): each chunk is loaded before it is stored."""
    if W.size == 0:
        return
    rows, cols = _rows_cols(W.shape)
    W2 = W.reshape(rows, cols)
    O2 = out.reshape(rows, cols)
    step = max(1, CHUNK_BYTES // (4 * cols))
    cbuf, dbuf = ctx.workspace(min(rows, step) * cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        k = (r1 - r0) * cols
        c = cbuf[:k].reshape(r1 - r0, cols)
        d = dbuf[:k].reshape(r1 - r0, cols)
        _load_f32(wc, W2[r0:r1], c)
        for left, right, coef in factors:
            _addmm(c, left[r0:r1], right, coef, d)
        _store_f32(oc, c, O2[r0:r1], d.view(np.uint32))


def _as_bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _compute(tp: TensorPlan, ctx: _Ctx) -> _Prepared:
    """The output bytes (out dtype) of one non-passthrough plan entry."""
    wc = tp.src.dtype
    if tp.replacement is not None:
        ai, key = tp.replacement
        wc = ctx.adapters[ai].dtype_code(key)
    oc = tp.out_dtype
    if tp.dora is not None or wc not in FAST or oc not in FAST or tp.src.dtype not in FAST:
        return _compute_torch(tp, ctx)

    fd = ctx.fds[tp.src.file]
    bufs: list[np.ndarray] = []
    if tp.replacement is not None:
        ai, key = tp.replacement
        W = ctx.adapters[ai].raw(key)
        if ctx.weights[ai] != 1.0:
            base = shard_read.read_array(fd, tp.src)
            if not (tp.src.dtype == wc and _values_equal(wc, base, W)):
                raise MergeError(
                    f"adapter {ctx.adapters[ai].name!r} replaces {tp.name} (modules_to_save) and has weight "
                    f"{ctx.weights[ai]}; a replaced tensor cannot be scaled",
                    fix="give this adapter weight 1.0, or merge it without modules_to_save")
            del base
    else:
        bufs.append(ctx.pool.get(tp.src.nbytes))
        W = shard_read.read_array(fd, tp.src, bufs[-1])

    if tp.bias_from:  # 1-D bias vector: tiny
        if tp.contributions:  # a tensor is either a weight or a bias
            raise AssertionError(tp.name)
        Wf = shard_read.to_float32(wc, W).reshape(1, -1)
        for ai, m in tp.bias_from:
            Wf += ctx.lora(ai, m.bias_key).reshape(1, -1) * (float(ctx.weights[ai]) * m.scale)
        res = shard_read.raw_array(oc, np.empty(tp.out.nbytes, np.uint8), (1, Wf.shape[1]))
        _store_f32(oc, Wf, res, np.empty(Wf.shape, np.uint32))
        return _Prepared(_as_bytes(res), bufs)

    if wc == oc:
        out = W
    else:
        bufs.append(ctx.pool.get(tp.out.nbytes))
        out = shard_read.raw_array(oc, bufs[-1], tuple(tp.src.shape))
    if not tp.contributions and wc == oc:  # a replacement kept as is
        return _Prepared(_as_bytes(out), bufs)

    _merge_rows(W, wc, out, oc, _factor_terms(tp, ctx), ctx)
    return _Prepared(_as_bytes(out), bufs)


def _factor_terms(tp: TensorPlan, ctx: _Ctx) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(left, right, coef) per contribution with delta = left @ right in the weight's orientation."""
    terms = []
    for c in tp.contributions:
        A = ctx.lora(c.adapter, c.module.a_key)  # (r, in) | embedding (r, vocab)
        B = ctx.lora(c.adapter, c.module.b_key)  # (out, r) | embedding (dim, r)
        if c.transposed:  # delta = (B @ A).T = A.T @ B.T ; rows of the delta <-> columns of A
            terms.append((np.ascontiguousarray(A.T), np.ascontiguousarray(B.T), c.coef))
        else:  # rows of the delta <-> rows of B
            terms.append((B, A, c.coef))
    return terms


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    n = 1
    for d in shape:
        n *= d
    rows = shape[0] if len(shape) else 1
    return rows, (n // rows if rows else 0)


@dataclass
class _Fused:
    """An adapted weight that the compiled kernel merges straight into the output's staging buffer."""

    factors: kernels.Factors


def _fusable(tp: TensorPlan, kern: kernels.Kernel | None) -> bool:
    return (kern is not None and bool(tp.contributions) and tp.replacement is None and tp.dora is None
            and not tp.bias_from and kern.supports(tp.src.dtype, tp.out_dtype) and tp.src.numel > 0)


def _fused(tp: TensorPlan, ctx: _Ctx) -> _Fused:
    rows, cols = _rows_cols(tp.src.shape)
    return _Fused(kernels.Factors(_factor_terms(tp, ctx), rows, cols))


PIECE_ELEMENTS = 1 << 20  # a thread's unit of work in _write_fused (2-4 MiB of output)


def _check_finite(name: str, code: str, data: "np.ndarray | memoryview") -> None:
    """Refuse merged bytes holding NaN/inf (all exponent bits set): alpha, weights or a delta overflowed."""
    n = shard_read.nonfinite_count(code, data)
    if n:
        raise MergeError(f"merged tensor {name} has {n} NaN/inf values ({code}): an adapter's lora_alpha, weight "
                         "or delta overflows it", fix="check the adapters' lora_alpha / r and the recipe's weight "
                         "values; nothing was written to the cache")


def _write_fused(w: shard_write.ShardWriter, tp: TensorPlan, fz: _Fused, ctx: _Ctx, kern: kernels.Kernel,
                 helpers: ThreadPoolExecutor | None, nhelpers: int) -> None:
    """Merge one weight into the writer's staging buffers. Each span is cut into pieces that this
    thread and the helpers take in turn (the kernel drops the GIL), so a thread that also does
    other work (this one copies the untouched tensors) simply takes fewer pieces."""
    sc, oc = tp.src.dtype, tp.out_dtype
    osz = kernels.ITEMSIZE[oc]
    fd, off = ctx.fds[tp.src.file], tp.src.offset
    e = 0
    for buf in w.spans(tp.name, tp.out.nbytes, unit=osz):
        n = len(buf) // osz
        pieces = deque((a, min(n, a + PIECE_ELEMENTS)) for a in range(0, n, PIECE_ELEMENTS))

        def work(e: int = e, buf: np.ndarray = buf, pieces: deque = pieces) -> None:
            while True:
                try:
                    a, b = pieces.popleft()
                except IndexError:
                    return
                kern.merge_fd(fd, off, sc, buf[a * osz:b * osz], oc, fz.factors, e + a, e + b)
                _check_finite(tp.name, oc, buf[a * osz:b * osz])

        k = min(nhelpers, len(pieces) - 1) if helpers is not None else 0
        futs = [helpers.submit(work) for _ in range(k)]
        try:
            work()
        finally:
            for f in futs:
                f.result()
        e += n


def _compute_torch(tp: TensorPlan, ctx: _Ctx) -> _Prepared:
    """The torch path: DoRA, and dtypes the numpy kernels do not handle (float64, float8 …)."""
    torch = _torch()
    od = shard_read.torch_dtype(tp.out_dtype)
    fd = ctx.fds[tp.src.file]
    if tp.replacement is not None:
        ai, key = tp.replacement
        rep = ctx.adapters[ai].tensor(key)
        if ctx.weights[ai] != 1.0:
            base = shard_read.read_tensor(fd, tp.src)
            if not (base.dtype == rep.dtype and torch.equal(base, rep)):
                raise MergeError(
                    f"adapter {ctx.adapters[ai].name!r} replaces {tp.name} (modules_to_save) and has weight "
                    f"{ctx.weights[ai]}; a replaced tensor cannot be scaled",
                    fix="give this adapter weight 1.0, or merge it without modules_to_save")
            del base
        W = rep
    else:
        W = shard_read.read_tensor(fd, tp.src)

    if tp.dora is not None:
        return _Prepared(shard_write.tensor_bytes(_compute_dora(W, tp, ctx, od)), [])

    if tp.bias_from:
        Wf = W.float()
        for ai, m in tp.bias_from:
            Wf += ctx.lora_t(ai, m.bias_key) * (float(ctx.weights[ai]) * m.scale)
        return _Prepared(shard_write.tensor_bytes(Wf.to(od)), [])
    if not tp.contributions:
        return _Prepared(shard_write.tensor_bytes(W.to(od)), [])
    Wf = W.float()
    for c in tp.contributions:
        A = ctx.lora_t(c.adapter, c.module.a_key)
        B = ctx.lora_t(c.adapter, c.module.b_key)
        if c.transposed:
            Wf.addmm_(A.t(), B.t(), alpha=c.coef)
        else:
            Wf.addmm_(B, A, alpha=c.coef)
    return _Prepared(shard_write.tensor_bytes(Wf.to(od)), [])


def _compute_dora(W: "torch.Tensor", tp: TensorPlan, ctx: _Ctx, od: "torch.dtype") -> "torch.Tensor":
    """PEFT's DoRA merge: W' = m / ||W + ΔW||_row · (W + ΔW), rows = output features."""
    torch = _torch()
    ai, m, tr = tp.dora
    A = ctx.lora_t(ai, m.a_key)
    B = ctx.lora_t(ai, m.b_key)
    mag = ctx.lora_t(ai, m.magnitude_key).reshape(-1)
    delta = (B @ A) * m.scale  # (out, in), like peft's get_delta_weight before transpose
    Wf = W.float()
    Wn = Wf.t() if tr else Wf  # (out, in) view
    merged = Wn + delta
    norm = torch.linalg.norm(merged, dim=1)
    merged = (mag / norm).view(-1, 1) * merged
    res = merged.t() if tr else merged
    return res.contiguous().to(od)


