"""Streaming, out-of-core LoRA merge.

``merge_model`` writes ``W' = W + Σ_i weight_i · scale_i · (B_i @ A_i)`` for every adapted weight
(computed in float32, cast to the output dtype once) and copies every other tensor through, one
tensor at a time:

* the backbone's safetensors headers are parsed up front, so the whole output layout (shards, JSON
  headers, index) is known before any byte of data is read, and every adapter/backbone mismatch is
  reported before anything is written;
* the output is written with ``O_DIRECT`` through block-aligned staging buffers where the
  filesystem allows it (see :class:`~peftdeploy.merge.stio.ShardWriter`;
  ``PEFTDEPLOY_MERGE_DIRECT_IO=0`` writes through the page cache instead): filling the page cache
  with a new multi-GB file costs the kernel more CPU than the merge arithmetic, and evicts what
  other processes cached. A writer thread (:class:`~peftdeploy.merge.stio.WriteQueue`, shared by
  all shards) writes each full buffer while the next one is filled, so the disk never waits for
  the arithmetic and the arithmetic never waits for the disk, shard boundaries included;
* adapted weights of float16/bfloat16/float32 are merged by the compiled fused kernel
  (:mod:`~peftdeploy.merge.kernels`, built by ``pip install``) straight into the staging buffer:
  it reads the weight from the backbone file (``pread`` in cache-sized pieces), computes
  ``W + Σ coef·L@R`` in float32 registers and rounds once (round to nearest even, bit for bit
  torch's casts) — one pass over memory, the same bytes on every CPU; each buffer's range is cut
  into pieces that the calling thread and ``threads`` helper threads take in turn (ctypes drops
  the GIL). Without the kernel (no C compiler at install time, ``PEFTDEPLOY_MERGE_KERNEL=numpy``)
  a worker thread computes whole tensors with numpy in float32 row chunks that stay in cache
  (numpy's bundled OpenBLAS ``cblas_sgemm`` through ctypes for ``C += coef·B@A``);
* untouched tensors whose dtype does not change are byte ranges of the backbone shard, copied bit
  for bit (``pread`` into the staging buffer, or ``copy_file_range`` kernel-side when writing
  through the page cache);
* the merge does not import torch (importing torch alone takes longer than copying a 2 GB
  model); torch is imported only for DoRA, pickled adapters and float64/float8 tensors;
* each output shard's header is written first and the tensors' bytes are streamed after it, so
  peak memory is the staging buffers plus the adapters, independent of shard and model size;
* the SHA-256 of the backbone shards (provenance) is computed by two other threads while the
  merge runs (hashlib drops the GIL) unless they are known: memoized by a
  :class:`~peftdeploy.merge.hashing.HashCache`, or the blob names of a Hugging Face hub cache.

The output is a plain Hugging Face model directory: sharded ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json`` (or a single ``model.safetensors``), the backbone's config.json
(``torch_dtype``/``dtype`` updated when the dtype changes), tokenizer, generation config, chat
templates and every other non-weight file, and ``peftdeploy-provenance.json``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

import peftdeploy
from peftdeploy.errors import MergeError
from peftdeploy.merge import kernels, manifest, stio
from peftdeploy.merge.common import (COMPLETE_MARKER, DEFAULT_SHARD_SIZE, MERGE_ENGINE_VERSION, PROVENANCE_FILE,
                                     SAFE_INDEX, SAFE_SINGLE, AdapterInput, Backbone, MergeResult, dtype_name,
                                     iter_aux_files, open_backbone)
from peftdeploy.merge.hashing import HashCache
from peftdeploy.merge.lora import LoraAdapter, LoraModule, adapter_fingerprint_files, open_adapter

if TYPE_CHECKING:
    import torch

__all__ = ["merge_model", "plan_merge", "resolve_dtype", "default_threads", "AdapterInput", "MergeResult",
           "open_backbone", "DEFAULT_SHARD_SIZE", "MERGE_ENGINE_VERSION", "PROVENANCE_FILE", "COMPLETE_MARKER"]

WRITE_BUFFER_BYTES = 16 << 20  # O_DIRECT staging buffers: WRITE_BUFFERS of them in flight at most
WRITE_BUFFERS = 4
HASH_THREADS = 2  # backbone shards hashed at once when their SHA-256 is not known yet
CHUNK_BYTES = 512 << 10  # float32 working set per row chunk of an adapted weight (two of them fit in L2)
FAST = {"BF16", "F16", "F32"}  # dtypes the numpy kernels load and store (others: torch fallback)
_NAME_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
TEST_DELAY_ENV = "PEFTDEPLOY_MERGE_TEST_DELAY"  # tests only: seconds to sleep after each tensor
DIRECT_IO_ENV = "PEFTDEPLOY_MERGE_DIRECT_IO"  # "0": write the output through the page cache


def default_threads() -> int:
    """Helper threads beside the calling one: one per other core, at most 4 (the writer thread
    mostly waits for the disk; beyond ~5 threads the disk is the limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n - 1))


def _torch():  # noqa: ANN202 - torch is only needed for DoRA, pickled adapters and exotic dtypes
    import torch

    return torch


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """The output torch dtype; None for "auto" (keep each tensor's stored dtype). Imports torch."""
    name = dtype_name(dtype)
    return None if name is None else getattr(_torch(), name)


def _out_code(dtype: Any) -> str | None:
    """safetensors code of the output dtype (a name, a torch dtype or None/"auto")."""
    name = dtype_name(dtype)
    return None if name is None else _NAME_CODE[name]


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contribution:
    adapter: int  # index into the adapters list
    module: LoraModule
    transposed: bool
    coef: float  # weight * scale


@dataclass
class TensorPlan:
    name: str
    src: stio.TensorInfo
    out_dtype: str  # safetensors code
    contributions: list[Contribution] = field(default_factory=list)
    bias_from: list[tuple[int, LoraModule]] = field(default_factory=list)  # lora_bias deltas
    replacement: tuple[int, str] | None = None  # (adapter index, key)
    dora: tuple[int, LoraModule, bool] | None = None

    @property
    def passthrough(self) -> bool:
        return (not self.contributions and not self.bias_from and self.replacement is None
                and self.dora is None and self.out_dtype == self.src.dtype)

    @property
    def out(self) -> stio.OutTensor:
        return stio.OutTensor(self.name, self.out_dtype, self.src.shape)


@dataclass
class Plan:
    tensors: list[TensorPlan]
    shards: list[list[TensorPlan]]
    shard_names: list[str]


def _fmt_list(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    s = ", ".join(items[:n])
    return s + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def plan_merge(backbone: Backbone, adapters: Sequence[LoraAdapter], weights: Sequence[float],
               out_dtype: "torch.dtype | str | None", shard_size_bytes: int) -> Plan:
    """Check every adapter against the backbone and lay the output out. Reads no backbone tensor data.

    `out_dtype`: a torch dtype or a dtype name ("bfloat16", ...); None or "auto" keeps each tensor's."""
    plans = {}
    oc = _out_code(out_dtype)
    for n, t in backbone.tensors.items():
        od = t.dtype
        if oc is not None and t.dtype in stio.FLOAT_ST:
            od = oc
        plans[n] = TensorPlan(n, t, od)

    unmatched: list[str] = []
    for ai, (ad, w) in enumerate(zip(adapters, weights)):
        mism: list[str] = []
        for target, m in ad.modules.items():
            src = backbone.tensors.get(target)
            if src is None:
                unmatched.append(f"{ad.name}:{m.module}")
                continue
            if src.dtype not in stio.FLOAT_ST:
                raise MergeError(f"backbone tensor {target} is {src.dtype}, not a float tensor (quantized?)",
                                 fix="merge into an unquantized backbone")
            tr = m.orientation(src.shape)
            if tr is None:
                mism.append(f"{m.module} (adapter delta {m.natural_shape[0]}x{m.natural_shape[1]}"
                            f"{', embedding' if m.kind == 'embedding' else ''}, backbone {tuple(src.shape)})")
                continue
            tp = plans[target]
            if m.magnitude_key is not None:
                if w != 1.0:
                    raise MergeError(f"adapter {ad.name!r} uses DoRA, which cannot be merged with weight {w}",
                                     fix="merge DoRA adapters with weight 1.0")
                mshape = ad.shape(m.magnitude_key)
                if tuple(mshape) not in ((m.natural_shape[0],), (1, m.natural_shape[0])):
                    raise MergeError(f"adapter {ad.name!r}: DoRA magnitude of {m.module} has shape {mshape}",
                                     fix="re-save the adapter with peft")
                tp.dora = (ai, m, tr)
            else:
                tp.contributions.append(Contribution(ai, m, tr, float(w) * m.scale))
            if m.bias_key is not None:
                bt = backbone.tensors.get(m.bias_target)
                if bt is None:
                    raise MergeError(f"adapter {ad.name!r} has a LoRA bias (lora_bias) for {m.module} but the "
                                     "backbone layer has no bias", fix="use an adapter trained on this backbone")
                if tuple(bt.shape) != (m.natural_shape[0],):
                    mism.append(f"{m.bias_target} (lora bias {ad.shape(m.bias_key)}, backbone {bt.shape})")
                    continue
                plans[m.bias_target].bias_from.append((ai, m))
        for target, key in ad.replacements.items():
            src = backbone.tensors.get(target)
            if src is None:
                unmatched.append(f"{ad.name}:{target} (modules_to_save)")
                continue
            if tuple(ad.shape(key)) != tuple(src.shape):
                mism.append(f"{target} (adapter's saved copy {tuple(ad.shape(key))}, backbone {tuple(src.shape)})")
                continue
            tp = plans[target]
            if tp.replacement is not None:
                prev_ai, prev_key = tp.replacement
                pa = adapters[prev_ai]
                if pa.dtype_code(prev_key) != ad.dtype_code(key) or not _values_equal(
                        ad.dtype_code(key), pa.raw(prev_key), ad.raw(key)):
                    raise MergeError(
                        f"adapters {adapters[prev_ai].name!r} and {ad.name!r} both replace {target} "
                        "(modules_to_save) with different values; a merge can keep only one",
                        fix="merge them separately, or drop modules_to_save from one of them")
                continue
            tp.replacement = (ai, key)
        if mism:
            raise MergeError(f"adapter {ad.name!r} does not fit the backbone: shape mismatch for "
                             f"{_fmt_list(mism, 4)}",
                             fix="use an adapter trained on this backbone (same architecture and size)")
    if unmatched:
        hint = ""
        if any(u.split(":", 1)[1].startswith("lm_head") for u in unmatched) and \
                backbone.config.get("tie_word_embeddings") and "lm_head.weight" not in backbone.tensors:
            hint = " (lm_head is tied to the input embeddings in this backbone, so it has no weight of its own)"
        raise MergeError(
            f"{len(unmatched)} adapted module(s) have no weight in the backbone: {_fmt_list(unmatched)}{hint}",
            fix="use an adapter trained on this backbone; module names must match the backbone's tensor names "
                "(e.g. an adapter on q_proj/k_proj/v_proj cannot be merged into a backbone storing a packed qkv_proj)")

    for tp in plans.values():
        if tp.dora is not None and (tp.contributions or tp.replacement is not None):
            others = {adapters[c.adapter].name for c in tp.contributions}
            raise MergeError(f"{tp.name}: a DoRA adapter ({adapters[tp.dora[0]].name!r}) and other adapters "
                             f"({_fmt_list(sorted(others))}) adapt the same weight; this merge cannot combine them",
                             fix="merge the DoRA adapter alone")

    # layout: input order, greedy shards; within a shard largest itemsize first (alignment)
    ordered = list(plans.values())
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tp in ordered:
        nb = tp.out.nbytes
        if shards[-1] and size + nb > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += nb
    for s in shards:
        s.sort(key=lambda tp: -stio.ST_ITEMSIZE[tp.out_dtype])  # stable
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return Plan([tp for s in shards for tp in s], shards, names)


# ---------------------------------------------------------------------------------------------
# compute
# ---------------------------------------------------------------------------------------------
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


def _values_equal(code: str, a: np.ndarray, b: np.ndarray) -> bool:
    """torch.equal for two storage arrays of the same dtype code (bf16 compared as values)."""
    if a.shape != b.shape:
        return False
    if code == "BF16":
        a, b = stio.to_float32(code, a), stio.to_float32(code, b)
    return bool(np.array_equal(a, b))


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
            base = stio.read_array(fd, tp.src)
            if not (tp.src.dtype == wc and _values_equal(wc, base, W)):
                raise MergeError(
                    f"adapter {ctx.adapters[ai].name!r} replaces {tp.name} (modules_to_save) and has weight "
                    f"{ctx.weights[ai]}; a replaced tensor cannot be scaled",
                    fix="give this adapter weight 1.0, or merge it without modules_to_save")
            del base
    else:
        bufs.append(ctx.pool.get(tp.src.nbytes))
        W = stio.read_array(fd, tp.src, bufs[-1])

    if tp.bias_from:  # 1-D bias vector: tiny
        if tp.contributions:  # a tensor is either a weight or a bias
            raise AssertionError(tp.name)
        Wf = stio.to_float32(wc, W).reshape(1, -1)
        for ai, m in tp.bias_from:
            Wf += ctx.lora(ai, m.bias_key).reshape(1, -1) * (float(ctx.weights[ai]) * m.scale)
        res = stio.raw_array(oc, np.empty(tp.out.nbytes, np.uint8), (1, Wf.shape[1]))
        _store_f32(oc, Wf, res, np.empty(Wf.shape, np.uint32))
        return _Prepared(_as_bytes(res), bufs)

    if wc == oc:
        out = W
    else:
        bufs.append(ctx.pool.get(tp.out.nbytes))
        out = stio.raw_array(oc, bufs[-1], tuple(tp.src.shape))
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
    n = stio.nonfinite_count(code, data)
    if n:
        raise MergeError(f"merged tensor {name} has {n} NaN/inf values ({code}): an adapter's lora_alpha, weight "
                         "or delta overflows it", fix="check the adapters' lora_alpha / r and the recipe's weight "
                         "values; nothing was written to the cache")


def _write_fused(w: stio.ShardWriter, tp: TensorPlan, fz: _Fused, ctx: _Ctx, kern: kernels.Kernel,
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
    od = stio.torch_dtype(tp.out_dtype)
    fd = ctx.fds[tp.src.file]
    if tp.replacement is not None:
        ai, key = tp.replacement
        rep = ctx.adapters[ai].tensor(key)
        if ctx.weights[ai] != 1.0:
            base = stio.read_tensor(fd, tp.src)
            if not (base.dtype == rep.dtype and torch.equal(base, rep)):
                raise MergeError(
                    f"adapter {ctx.adapters[ai].name!r} replaces {tp.name} (modules_to_save) and has weight "
                    f"{ctx.weights[ai]}; a replaced tensor cannot be scaled",
                    fix="give this adapter weight 1.0, or merge it without modules_to_save")
            del base
        W = rep
    else:
        W = stio.read_tensor(fd, tp.src)

    if tp.dora is not None:
        return _Prepared(stio.tensor_bytes(_compute_dora(W, tp, ctx, od)), [])

    if tp.bias_from:
        Wf = W.float()
        for ai, m in tp.bias_from:
            Wf += ctx.lora_t(ai, m.bias_key) * (float(ctx.weights[ai]) * m.scale)
        return _Prepared(stio.tensor_bytes(Wf.to(od)), [])
    if not tp.contributions:
        return _Prepared(stio.tensor_bytes(W.to(od)), [])
    Wf = W.float()
    for c in tp.contributions:
        A = ctx.lora_t(c.adapter, c.module.a_key)
        B = ctx.lora_t(c.adapter, c.module.b_key)
        if c.transposed:
            Wf.addmm_(A.t(), B.t(), alpha=c.coef)
        else:
            Wf.addmm_(B, A, alpha=c.coef)
    return _Prepared(stio.tensor_bytes(Wf.to(od)), [])


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


# -- BLAS ----------------------------------------------------------------------------------------
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


def _addmm(c: np.ndarray, left: np.ndarray, right: np.ndarray, coef: float, d: np.ndarray) -> None:
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
def _single_threaded_blas() -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------
# non-weight files
# ---------------------------------------------------------------------------------------------
def _copy_aux_files(src: Path, dst: Path, new_dtype: str | None) -> list[str]:
    copied = []
    for s in iter_aux_files(src):
        rel = s.relative_to(src)
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json") and new_dtype is not None:
            cfg = json.loads(s.read_text())
            upd = json.loads(json.dumps(cfg))
            _set_dtype(upd, new_dtype)
            if upd != cfg:
                d.write_text(json.dumps(upd, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(s, d)
        else:
            shutil.copyfile(s, d)  # follows symlinks (hub cache)
        copied.append(str(rel))
    return copied


def _set_dtype(cfg: dict[str, Any], dtype: str) -> None:
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg]
    for k in keys or ["torch_dtype"]:
        cfg[k] = dtype
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(cfg.get(sub), dict):
            for k in ("torch_dtype", "dtype"):
                if k in cfg[sub]:
                    cfg[sub][k] = dtype


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int, label: str):
        self.enabled = enabled
        self.n = total_tensors
        self.done = 0
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                          TextColumn("{task.fields[tensors]}"), DownloadColumn(binary_units=True),
                          TransferSpeedColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True), transient=False)
        self.task = self.p.add_task(label, total=total_bytes, tensors=f"0/{total_tensors}")
        self.p.start()

    def advance(self, nbytes: int) -> None:
        self.done += 1
        if self.enabled:
            self.p.update(self.task, advance=nbytes, tensors=f"{self.done}/{self.n}")

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------
def _ordered(tasks: Sequence[TensorPlan], fn: Callable[[TensorPlan], Any], workers: int) -> Iterator[Any]:
    """fn over tasks in order, prepared by `workers` threads at most `workers`+1 tasks ahead."""
    if workers <= 0:
        for t in tasks:
            yield fn(t)
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peftdeploy-merge")
    window: deque[Future] = deque()
    it = iter(tasks)
    try:
        for t in it:
            window.append(ex.submit(fn, t))
            if len(window) > workers:
                break
        while window:
            f = window.popleft()
            res = f.result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(ex.submit(fn, nxt))
            yield res
    finally:
        for f in window:
            f.cancel()
        ex.shutdown(wait=True)


_SPACE_FIX = ("free space there, or merge onto a larger disk: PEFTDEPLOY_CACHE (the merge cache) or "
              "policy.merge.output in the recipe")


def _check_space(out: Path, nbytes: int) -> None:
    """Refuse up front when the output's filesystem cannot hold the merged weights (rather than
    failing after writing gigabytes)."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if free < nbytes + (16 << 20):
        from peftdeploy.plan.memory import gib

        raise MergeError(f"not enough space under {out}: the merged model needs {gib(nbytes)}, {gib(free)} "
                         "are free", fix=_SPACE_FIX)


def _cleanup(out: Path, created: bool) -> None:
    """Remove what a failed merge wrote (the directory itself if this merge created it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in list(out.iterdir()):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def merge_model(
    backbone_dir: str | os.PathLike[str],
    adapters: Sequence[AdapterInput],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    threads: int | None = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    hash_cache: HashCache | None = None,
    fsync: bool = False,
    digests: dict[str, str] | None = None,
    _extra_provenance: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge LoRA adapters into a backbone, streaming, and write a model directory to `out_dir`.

    `out_dir` must not exist or be empty; on error it is removed again (or emptied).
    `threads`: helper threads (default: one per other core, at most 4; 0 = none): they merge pieces
    of each weight with the calling thread (fused kernel), or prepare whole tensors ahead (numpy path).
    `fsync`: fsync every written file before returning (durability across power loss).
    `digests`: filled with ``{shard file: "<algo>:<hex>"}`` hashed while writing (the cache's manifest).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"output directory {out} exists and is not empty",
                         fix="choose a new output directory or remove it")
    if not adapters:
        raise MergeError("no adapters to merge", fix="list at least one adapter")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise MergeError(f"adapter names are not unique: {names}", fix="give each adapter its own name")
    od = dtype_name(dtype)  # None: auto
    if shard_size_bytes <= 0:
        raise MergeError("shard_size_bytes must be positive", fix="use e.g. 5_000_000_000")

    bb = open_backbone(backbone_dir)
    opened: list[LoraAdapter] = []
    try:
        for a in adapters:
            w = float(a.weight)
            if w != w or w in (float("inf"), float("-inf")):
                raise MergeError(f"adapter {a.name!r} has weight {a.weight}", fix="use a finite weight")
            opened.append(open_adapter(a.path, name=a.name, allow_pickle=allow_pickle))
        weights = [float(a.weight) for a in adapters]
        plan = plan_merge(bb, opened, weights, od, shard_size_bytes)
        timings["plan_s"] = time.perf_counter() - t0

        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            _check_space(out, sum(tp.out.nbytes for tp in plan.tensors))
            result = _run(bb, opened, adapters, weights, plan, out, od, threads, progress, provenance,
                          hash_cache, fsync, timings, t0, _extra_provenance or {}, digests=digests)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _cleanup(out, created)
                raise MergeError(f"the disk under {out} filled up while writing the merged model ({e.strerror})",
                                 fix=_SPACE_FIX) from None
            _cleanup(out, created)
            raise
        except BaseException:
            _cleanup(out, created)
            raise
        return result
    finally:
        for a in opened:
            a.close()


def _run(bb: Backbone, opened: list[LoraAdapter], adapters: Sequence[AdapterInput], weights: list[float],
         plan: Plan, out: Path, od: str | None, threads: int | None, progress: bool,
         provenance: dict[str, Any] | None, hash_cache: HashCache | None, fsync: bool,
         timings: dict[str, float], t0: float, extra: dict[str, Any],
         digests: dict[str, str] | None = None) -> MergeResult:
    hc = hash_cache if hash_cache is not None else HashCache(None)
    # backbone shard hashes in the background (free when memoized)
    hashes: dict[str, str] = {}
    hash_err: list[BaseException] = []
    stop_hashing = threading.Event()

    todo = deque(bb.files)
    hash_done: list[float] = []

    def _hash_some() -> None:  # a hashing thread: shards in turn until none is left
        try:
            while not stop_hashing.is_set():
                try:
                    f = todo.popleft()
                except IndexError:
                    return
                hashes[str(f)] = hc.sha256(f)
        except BaseException as e:  # reported after the merge
            hash_err.append(e)
        finally:
            hash_done.append(time.perf_counter())

    t_hash = time.perf_counter()
    known = sum(hc.lookup(f) is not None for f in bb.files)
    n_hashers = 1 if len(bb.files) - known <= 1 else HASH_THREADS  # SHA-256 is serial per file
    hashers = [threading.Thread(target=_hash_some, name="peftdeploy-hash", daemon=True) for _ in range(n_hashers)]
    for h in hashers:
        h.start()

    auto_name = bb.stored_dtype()
    out_name = dtype_name(od) if od is not None else auto_name
    new_cfg_dtype = out_name if od is not None else None
    t = time.perf_counter()
    aux = _copy_aux_files(bb.path, out, new_cfg_dtype)
    timings["copy_aux_s"] = time.perf_counter() - t

    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    direct = os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    workers = default_threads() if threads is None else max(0, int(threads))
    ctx = _Ctx(bb, opened, weights, keep=workers + 2)
    total = sum(tp.out.nbytes for tp in plan.tensors)
    prog = _Progress(progress, total, len(plan.tensors), "merge")
    n_merged = n_copied = n_converted = n_replaced = n_fused = 0
    t = time.perf_counter()

    kern = kernels.load()
    helpers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="peftdeploy-kernel") if (
        kern is not None and workers) else None

    def prepare(tp: TensorPlan) -> _Prepared | _Fused | None:
        if tp.passthrough:
            return None
        return _fused(tp, ctx) if _fusable(tp, kern) else _compute(tp, ctx)

    blas = _single_threaded_blas()
    blas.__enter__()
    results = _ordered(plan.tensors, prepare, workers)
    # staging buffers no larger than a quarter of the output: small models do not pay for 64 MiB
    wq = stio.WriteQueue(min(WRITE_BUFFER_BYTES, max(stio.DIRECT_ALIGN, total // 4)), WRITE_BUFFERS) if direct else None
    writers: list[tuple[str, stio.ShardWriter]] = []
    try:
        weight_map: dict[str, str] = {}
        shard_meta = []
        for shard, fname in zip(plan.shards, plan.shard_names):
            w = stio.ShardWriter(out / fname, [tp.out for tp in shard], direct=direct, queue=wq,
                                 hasher=manifest.stream_hasher() if digests is not None else None)
            try:
                for tp in shard:
                    res = next(results)
                    if res is None:
                        w.copy_from(tp.name, ctx.fds[tp.src.file], tp.src.offset, tp.src.nbytes)
                        n_copied += 1
                    elif isinstance(res, _Fused):
                        _write_fused(w, tp, res, ctx, kern, helpers, workers)
                        n_merged += 1
                        n_fused += 1
                    else:
                        if tp.contributions or tp.dora or tp.bias_from:
                            _check_finite(tp.name, tp.out_dtype, res.data)
                        w.write_bytes(tp.name, res.data)
                        for b in res.buffers:
                            ctx.pool.put(b)
                        del res
                        if tp.contributions or tp.dora or tp.bias_from:
                            n_merged += 1
                        elif tp.replacement is not None:
                            n_replaced += 1
                        else:
                            n_converted += 1
                    weight_map[tp.name] = fname
                    prog.advance(tp.out.nbytes)
                    if delay:
                        time.sleep(delay)
                w.close(fsync=fsync)
            except BaseException:
                w.abort()
                raise
            shard_meta.append({"file": fname, "size": w.size, "tensors": len(shard)})
            writers.append((fname, w))
        if wq is not None:
            wq.close()  # every shard written and closed
        if digests is not None:
            digests.update({f: d for f, w in writers if (d := w.digest()) is not None})
    except BaseException:
        stop_hashing.set()
        if wq is not None:
            wq.close(check=False)
        raise
    finally:
        results.close()  # joins the workers
        if helpers is not None:
            helpers.shutdown(wait=True)
        blas.__exit__(None, None, None)
        prog.close()
        ctx.close()
    timings["tensors_s"] = time.perf_counter() - t
    total_size = sum(tp.out.nbytes for tp in plan.tensors)
    if len(plan.shards) > 1:
        idx = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(idx, indent=2) + "\n")

    t = time.perf_counter()
    for h in hashers:
        h.join()
    timings["hash_wait_s"] = time.perf_counter() - t
    timings["hash_backbone_s"] = max(hash_done, default=t_hash) - t_hash
    if hash_err:
        raise hash_err[0]
    ad_hashes = [{str(p.name): hc.sha256(p) for p in adapter_fingerprint_files(Path(a.path))} for a in adapters]
    hc.save()

    timings["total_s"] = time.perf_counter() - t0
    prov = {
        "peftdeploy_version": peftdeploy.__version__,
        "merge_engine_version": MERGE_ENGINE_VERSION,
        "merge_kernel": kernels.kernel_id(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pid": os.getpid(),
        "provenance": provenance or {},
        "backbone": {
            "path": str(bb.path),
            "dtype": auto_name,
            "files": [{"name": f.name, "size": f.stat().st_size, "sha256": hashes[str(f)]} for f in bb.files],
        },
        "adapters": [
            dict(o.summary(), weight=w, sha256=h.get("adapter_model.safetensors") or h.get("adapter_model.bin"),
                 config_sha256=h.get("adapter_config.json"))
            for o, w, h in zip(opened, weights, ad_hashes)
        ],
        "output": {"dtype": out_name, "shards": shard_meta, "total_size": total_size,
                   "files_copied": aux},
        "stats": {"tensors": len(plan.tensors), "merged": n_merged, "fused_kernel": n_fused, "copied": n_copied,
                  "converted": n_converted, "replaced": n_replaced},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        **extra,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    if fsync:
        for p in [out / PROVENANCE_FILE, out / SAFE_INDEX]:
            if p.exists():
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    return MergeResult(path=out, cache_hit=False, key=extra.get("cache_key"), seconds=timings["total_s"],
                       dtype=out_name, provenance=prov)


