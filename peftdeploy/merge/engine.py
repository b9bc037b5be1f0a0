"""Streaming, out-of-core LoRA merge.

``merge_model`` writes ``W' = W + Σ_i weight_i · scale_i · (B_i @ A_i)`` for every adapted weight
(computed in float32, cast to the output dtype once) and copies every other tensor through, one
tensor at a time:

* the backbone's safetensors headers are parsed up front, so the whole output layout (shards, JSON
  headers, index) is known before any byte of data is read, and every adapter/backbone mismatch is
  reported before anything is written;
* untouched tensors whose dtype does not change are copied kernel-side (``copy_file_range``) —
  they never enter this process's memory; the others are read with ``pread`` (one tensor), and
  adapted weights are computed in float32 row chunks of ~``CHUNK_BYTES``;
* each output shard's header is written first and the tensors' bytes are streamed after it, so
  peak memory is one tensor plus the prefetch window, independent of shard and model size;
* a worker thread prepares the next tensors while the main thread writes; the SHA-256 of the
  backbone shards (provenance) is computed by another thread while the merge runs (hashlib drops
  the GIL) unless a :class:`~peftdeploy.merge.hashing.HashCache` already knows them.

The output is a plain Hugging Face model directory: sharded ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json`` (or a single ``model.safetensors``), the backbone's config.json
(``torch_dtype``/``dtype`` updated when the dtype changes), tokenizer, generation config, chat
templates and every other non-weight file, and ``peftdeploy-provenance.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import peftdeploy
from peftdeploy.errors import MergeError
from peftdeploy.merge import stio
from peftdeploy.merge.common import (COMPLETE_MARKER, DEFAULT_SHARD_SIZE, MERGE_ENGINE_VERSION, PROVENANCE_FILE,
                                     SAFE_INDEX, SAFE_SINGLE, AdapterInput, Backbone, MergeResult, dtype_name,
                                     iter_aux_files, open_backbone)
from peftdeploy.merge.hashing import HashCache
from peftdeploy.merge.lora import LoraAdapter, LoraModule, adapter_fingerprint_files, open_adapter

__all__ = ["merge_model", "plan_merge", "resolve_dtype", "default_threads", "AdapterInput", "MergeResult",
           "open_backbone", "DEFAULT_SHARD_SIZE", "MERGE_ENGINE_VERSION", "PROVENANCE_FILE", "COMPLETE_MARKER"]

CHUNK_BYTES = 4 << 20  # float32 working set per row chunk of an adapted weight (fits in L2/L3)
TEST_DELAY_ENV = "PEFTDEPLOY_MERGE_TEST_DELAY"  # tests only: seconds to sleep after each tensor


def default_threads() -> int:
    """Worker threads preparing tensors: one per spare core, at most 4 (the writer and the
    backbone hasher take a core each; beyond a few workers the disk is the limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n - 2))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The output torch dtype; None for "auto" (keep each tensor's stored dtype)."""
    name = dtype_name(dtype)
    return None if name is None else getattr(torch, name)


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
               out_dtype: torch.dtype | None, shard_size_bytes: int) -> Plan:
    """Check every adapter against the backbone and lay the output out. Reads no tensor data."""
    plans = {}
    for n, t in backbone.tensors.items():
        od = t.dtype
        if out_dtype is not None and t.dtype in stio.FLOAT_ST:
            od = stio.st_code(out_dtype)
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
                a = adapters[prev_ai].tensor(prev_key)
                b = ad.tensor(key)
                if a.dtype != b.dtype or not torch.equal(a, b):
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
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fit = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fit:
                return self._free.pop(min(fit, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def put(self, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:  # drop the smallest (tensors are compared by identity)
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


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

    def workspace(self, numel: int) -> torch.Tensor:
        ws = getattr(self._local, "ws", None)
        if ws is None or ws.numel() < numel:
            ws = self._local.ws = torch.empty(numel, dtype=torch.float32)
        return ws[:numel]

    def lora(self, ai: int, key: str) -> torch.Tensor:
        t = self.adapters[ai].tensor(key).float()
        if not torch.isfinite(t).all():
            raise MergeError(f"adapter {self.adapters[ai].name!r}: {key} holds NaN/inf values",
                             fix="the adapter is broken; re-train or re-export it")
        return t


@dataclass
class _Prepared:
    """A tensor ready to be written, and the pooled buffers to give back once it is."""

    tensor: torch.Tensor
    buffers: list[torch.Tensor]


def _compute(tp: TensorPlan, ctx: _Ctx) -> _Prepared:
    """The output tensor (out dtype) of one non-passthrough plan entry."""
    od = stio.torch_dtype(tp.out_dtype)
    fd = ctx.fds[tp.src.file]
    bufs: list[torch.Tensor] = []
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
        bufs.append(ctx.pool.get(tp.src.nbytes))
        W = stio.read_tensor(fd, tp.src, bufs[-1])

    if tp.dora is not None:
        return _Prepared(_compute_dora(W, tp, ctx, od), bufs)

    if tp.bias_from:  # 1-D bias vector: tiny
        Wf = W.float()
        for ai, m in tp.bias_from:
            Wf += ctx.lora(ai, m.bias_key) * (float(ctx.weights[ai]) * m.scale)
        if tp.contributions:  # a tensor is either a weight or a bias
            raise AssertionError(tp.name)
        return _Prepared(Wf.to(od), bufs)

    if W.dtype == od:
        out = W
    else:
        bufs.append(ctx.pool.get(tp.out.nbytes))
        out = bufs[-1][: tp.out.nbytes].view(od).reshape(W.shape)
    if not tp.contributions:  # dtype conversion only
        if out is not W:
            out.copy_(W)
        return _Prepared(out, bufs)

    factors = []
    for c in tp.contributions:
        A = ctx.lora(c.adapter, c.module.a_key)  # (r, in) | embedding (r, vocab)
        B = ctx.lora(c.adapter, c.module.b_key)  # (out, r) | embedding (dim, r)
        if c.transposed:  # delta = (B @ A).T = A.T @ B.T ; rows of the delta <-> columns of A
            factors.append((A.t(), B.t(), c.coef))
        else:  # rows of the delta <-> rows of B
            factors.append((B, A, c.coef))

    # W' = W + Σ coef · left @ right, in float32, in row chunks that stay in cache
    rows = W.shape[0]
    cols = W.numel() // max(rows, 1)
    step = max(1, CHUNK_BYTES // max(4 * cols, 1))
    ws = ctx.workspace(min(rows, step) * cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = ws[: (r1 - r0) * cols].view(r1 - r0, cols)
        chunk.copy_(W[r0:r1])
        for left, right, coef in factors:
            chunk.addmm_(left[r0:r1], right, alpha=coef)
        out[r0:r1].copy_(chunk)
    return _Prepared(out, bufs)


def _compute_dora(W: torch.Tensor, tp: TensorPlan, ctx: _Ctx, od: torch.dtype) -> torch.Tensor:
    """PEFT's DoRA merge: W' = m / ||W + ΔW||_row · (W + ΔW), rows = output features."""
    ai, m, tr = tp.dora
    A = ctx.lora(ai, m.a_key)
    B = ctx.lora(ai, m.b_key)
    mag = ctx.lora(ai, m.magnitude_key).reshape(-1)
    delta = (B @ A) * m.scale  # (out, in), like peft's get_delta_weight before transpose
    Wf = W.float()
    Wn = Wf.t() if tr else Wf  # (out, in) view
    merged = Wn + delta
    norm = torch.linalg.norm(merged, dim=1)
    merged = (mag / norm).view(-1, 1) * merged
    res = merged.t() if tr else merged
    return res.contiguous().to(od)


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
    _extra_provenance: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge LoRA adapters into a backbone, streaming, and write a model directory to `out_dir`.

    `out_dir` must not exist or be empty; on error it is removed again (or emptied).
    `threads`: worker threads preparing tensors ahead of the writer (default 1; 0 = none).
    `fsync`: fsync every written file before returning (durability across power loss).
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
    od = resolve_dtype(dtype)
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
            result = _run(bb, opened, adapters, weights, plan, out, od, threads, progress, provenance,
                          hash_cache, fsync, timings, t0, _extra_provenance or {})
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in list(out.iterdir()):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise
        return result
    finally:
        for a in opened:
            a.close()


def _run(bb: Backbone, opened: list[LoraAdapter], adapters: Sequence[AdapterInput], weights: list[float],
         plan: Plan, out: Path, od: torch.dtype | None, threads: int | None, progress: bool,
         provenance: dict[str, Any] | None, hash_cache: HashCache | None, fsync: bool,
         timings: dict[str, float], t0: float, extra: dict[str, Any]) -> MergeResult:
    hc = hash_cache if hash_cache is not None else HashCache(None)
    # backbone shard hashes in the background (free when memoized)
    hashes: dict[str, str] = {}
    hash_err: list[BaseException] = []
    stop_hashing = threading.Event()

    def _hash_all() -> None:
        t = time.perf_counter()
        try:
            for f in bb.files:
                if stop_hashing.is_set():
                    return
                hashes[str(f)] = hc.sha256(f)
        except BaseException as e:  # reported after the merge
            hash_err.append(e)
        timings["hash_backbone_s"] = time.perf_counter() - t

    hasher = threading.Thread(target=_hash_all, name="peftdeploy-hash", daemon=True)
    hasher.start()

    auto_name = bb.stored_dtype()
    out_name = dtype_name(od) if od is not None else auto_name
    new_cfg_dtype = out_name if od is not None else None
    t = time.perf_counter()
    aux = _copy_aux_files(bb.path, out, new_cfg_dtype)
    timings["copy_aux_s"] = time.perf_counter() - t

    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    workers = default_threads() if threads is None else max(0, int(threads))
    ctx = _Ctx(bb, opened, weights, keep=workers + 2)
    total = sum(tp.out.nbytes for tp in plan.tensors)
    prog = _Progress(progress, total, len(plan.tensors), "merge")
    n_merged = n_copied = n_converted = n_replaced = 0
    t = time.perf_counter()

    def prepare(tp: TensorPlan) -> _Prepared | None:
        return None if tp.passthrough else _compute(tp, ctx)

    # Row chunks of rank-r updates are far too small for intra-op parallelism (OpenMP barriers
    # cost more than the arithmetic, badly so on a busy machine): one torch thread per worker.
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = _ordered(plan.tensors, prepare, workers)
    try:
        weight_map: dict[str, str] = {}
        shard_meta = []
        for shard, fname in zip(plan.shards, plan.shard_names):
            w = stio.ShardWriter(out / fname, [tp.out for tp in shard])
            try:
                for tp in shard:
                    res = next(results)
                    if res is None:
                        w.copy_from(tp.name, ctx.fds[tp.src.file], tp.src.offset, tp.src.nbytes)
                        n_copied += 1
                    else:
                        w.write_bytes(tp.name, stio.tensor_bytes(res.tensor))
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
    except BaseException:
        stop_hashing.set()
        raise
    finally:
        results.close()  # joins the workers
        torch.set_num_threads(prev_threads)
        prog.close()
        ctx.close()
    timings["tensors_s"] = time.perf_counter() - t
    total_size = sum(tp.out.nbytes for tp in plan.tensors)
    if len(plan.shards) > 1:
        idx = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(idx, indent=2) + "\n")

    t = time.perf_counter()
    hasher.join()
    timings["hash_wait_s"] = time.perf_counter() - t
    if hash_err:
        raise hash_err[0]
    ad_hashes = [{str(p.name): hc.sha256(p) for p in adapter_fingerprint_files(Path(a.path))} for a in adapters]
    hc.save()

    timings["total_s"] = time.perf_counter() - t0
    prov = {
        "peftdeploy_version": peftdeploy.__version__,
        "merge_engine_version": MERGE_ENGINE_VERSION,
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
        "stats": {"tensors": len(plan.tensors), "merged": n_merged, "copied": n_copied,
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


