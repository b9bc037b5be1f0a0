"""Streaming, out-of-core LoRA merge.

``merge_model`` writes ``W' = W + Σ_i weight_i · scale_i · (B_i @ A_i)`` for every adapted weight
(computed in float32, cast to the output dtype once) and copies every other tensor through, one
tensor at a time:

* the backbone's safetensors headers are parsed up front, so the whole output layout (shards, JSON
  headers, index) is known before any byte of data is read, and every adapter/backbone mismatch is
  reported before anything is written;
* the output is written with ``O_DIRECT`` through block-aligned staging buffers where the
  filesystem allows it (see :class:`~peftdeploy.merge.shard_write.ShardWriter`;
  ``PEFTDEPLOY_MERGE_DIRECT_IO=0`` writes through the page cache instead): filling the page cache
  with a new multi-GB file costs the kernel more CPU than the merge arithmetic, and evicts what
  other processes cached. A writer thread (:class:`~peftdeploy.merge.shard_write.WriteQueue`, shared by
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

This module is the pipeline (threads, writer, hashing, progress, provenance); the layout plan is
layout.py, the per-tensor arithmetic compute.py, the BLAS binding blas.py, the shard reader shard_read.py and writer shard_write.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import peftdeploy
from peftdeploy.errors import MergeError
from peftdeploy.merge import kernels, manifest, shard_write
from peftdeploy.merge.common import (COMPLETE_MARKER, DEFAULT_SHARD_SIZE, MERGE_ENGINE_VERSION, PROVENANCE_FILE,
                                     SAFE_INDEX, AdapterInput, Backbone, MergeResult, dtype_name,
                                     iter_aux_files, open_backbone)
from peftdeploy.merge.blas import single_threaded as _single_threaded_blas
from peftdeploy.merge.compute import _check_finite, _compute, _Ctx, _Fused, _fusable, _fused, _Prepared, _torch, _write_fused
from peftdeploy.merge.hashing import HashCache
from peftdeploy.merge.layout import Plan, TensorPlan, plan_merge
from peftdeploy.merge.lora import LoraAdapter, adapter_fingerprint_files, open_adapter
from peftdeploy.util import gib

if TYPE_CHECKING:
    import torch

__all__ = ["merge_model", "plan_merge", "resolve_dtype", "default_threads", "AdapterInput", "MergeResult",
           "open_backbone", "DEFAULT_SHARD_SIZE", "MERGE_ENGINE_VERSION", "PROVENANCE_FILE", "COMPLETE_MARKER"]

WRITE_BUFFER_BYTES = 16 << 20  # O_DIRECT staging buffers: WRITE_BUFFERS of them in flight at most
WRITE_BUFFERS = 4
HASH_THREADS = 2  # backbone shards hashed at once when their SHA-256 is not known yet
TEST_DELAY_ENV = "PEFTDEPLOY_MERGE_TEST_DELAY"  # tests only: seconds to sleep after each tensor
DIRECT_IO_ENV = "PEFTDEPLOY_MERGE_DIRECT_IO"  # "0": write the output through the page cache


def default_threads() -> int:
    """Helper threads beside the calling one: one per other core, at most 4 (the writer thread
    mostly waits for the disk; beyond ~5 threads the disk is the limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n - 1))


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """The output torch dtype; None for "auto" (keep each tensor's stored dtype). Imports torch."""
    name = dtype_name(dtype)
    return None if name is None else getattr(_torch(), name)


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
            job = _Job(backbone=bb, opened=opened, adapters=adapters, weights=weights, plan=plan, out=out,
                       out_dtype=od, threads=threads, progress=progress, provenance=provenance or {},
                       hash_cache=hash_cache if hash_cache is not None else HashCache(None), fsync=fsync,
                       extra=_extra_provenance or {}, digests=digests)
            result = _run(job, timings, t0)
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


@dataclass(frozen=True)
class _Job:
    """One merge as `merge_model` checked and opened it: everything `_run` needs."""

    backbone: Backbone
    opened: list[LoraAdapter]  # the adapters' files, open
    adapters: Sequence[AdapterInput]
    weights: list[float]
    plan: Plan
    out: Path
    out_dtype: str | None  # None: keep each tensor's stored dtype
    threads: int | None
    progress: bool
    provenance: dict[str, Any]
    hash_cache: HashCache
    fsync: bool
    extra: dict[str, Any]  # more provenance fields (the cache key)
    digests: dict[str, str] | None  # filled with the written shards' digests when given


def _run(job: _Job, timings: dict[str, float], t0: float) -> MergeResult:
    bb, opened, adapters, weights, plan, out = job.backbone, job.opened, job.adapters, job.weights, job.plan, job.out
    od, threads, progress, provenance, fsync = job.out_dtype, job.threads, job.progress, job.provenance, job.fsync
    hc, extra, digests = job.hash_cache, job.extra, job.digests
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
    wq = shard_write.WriteQueue(min(WRITE_BUFFER_BYTES, max(shard_write.DIRECT_ALIGN, total // 4)), WRITE_BUFFERS) if direct else None
    writers: list[tuple[str, shard_write.ShardWriter]] = []
    try:
        weight_map: dict[str, str] = {}
        shard_meta = []
        for shard, fname in zip(plan.shards, plan.shard_names):
            w = shard_write.ShardWriter(out / fname, [tp.out for tp in shard], direct=direct, queue=wq,
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


