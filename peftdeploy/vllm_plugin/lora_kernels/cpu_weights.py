"""Per-layer LoRA weights prepared once per adapter load (peftdeploy's CPU kernels, cpu.py)."""
from __future__ import annotations

from typing import Any

import torch


class _Layer:
    """Per-layer weights, prepared once per adapter load.

    ``packed`` (the stacks have version counters, so a load into a slot is seen): per live slot, the
    A of every slice that slot uses, cut to its effective rank (vLLM pads an adapter's rank up to
    max_lora_rank with zero rows), concatenated: ``a_t[slot]`` [in, K_slot]; and the matching B as
    one block-diagonal [K_slot, width] matrix ``b_bd[slot]`` (``blocks[slot]``: its (K rows, y
    columns) per slice). ``dense()`` stacks them over the live slots. Slots whose weights are all zero
    in this layer (the adapter does not target the module) are not ``live`` and cost nothing.

    Otherwise (inference tensors, no version counters): views of vLLM's stacks, read every call,
    one shrink + expand per slice, every slot live.
    """

    __slots__ = ("a", "b", "version", "a_t", "b_t", "b_bd", "blocks", "cols", "rank", "nslices", "width",
                 "packed", "nl", "live", "_dense")

    def __init__(self, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], version: tuple[int, ...] | None,
                 output_slices: tuple[int, ...]) -> None:
        self.a, self.b, self.version = a, b, version
        self.nl = nl = a[0].shape[0]
        self.rank = r = a[0].shape[2]
        self.nslices = len(a)
        self.packed = version is not None
        cols = []
        off = 0
        for w in output_slices:
            cols.append(slice(off, off + w))
            off += w
        self.cols = tuple(cols)
        self.width = off
        self._dense: Any = None
        self.a_t: dict[int, Any] = {}
        self.b_t: dict[int, Any] = {}
        self.b_bd: dict[int, torch.Tensor] = {}
        self.blocks: dict[int, tuple[tuple[slice, slice], ...]] = {}
        if not self.packed:
            self.live = None
            for s in range(nl):
                self.a_t[s] = tuple(t[s, 0].t() for t in a)
                self.b_t[s] = tuple(t[s, 0].t() for t in b)
            return
        live = []
        with torch.no_grad():
            # rank component j of slice i contributes only if row j of A and column j of B are non-zero
            used = [((ai[:, 0] != 0).any(dim=2) & (bi[:, 0] != 0).any(dim=1)).tolist() for ai, bi in zip(a, b)]
            for s in range(nl):
                parts_a, blocks = [], []
                k = 0
                for i in range(self.nslices):
                    u = used[i][s]
                    r_eff = max((j + 1 for j in range(r) if u[j]), default=0)
                    if r_eff:
                        parts_a.append(a[i][s, 0, :r_eff])
                        blocks.append((i, k, k + r_eff))
                        k += r_eff
                if not k:
                    continue
                live.append(s)
                self.a_t[s] = torch.cat(parts_a, dim=0).t()  # [in, K_slot]
                bd = torch.zeros((k, self.width), dtype=a[0].dtype, device=a[0].device)
                for i, k0, k1 in blocks:
                    bd[k0:k1, cols[i]] = b[i][s, 0, :, : k1 - k0].t()
                self.b_bd[s] = bd
                self.blocks[s] = tuple((slice(k0, k1), cols[i]) for i, k0, k1 in blocks)
        self.live = frozenset(live)

    def dense(self) -> tuple[torch.Tensor, tuple[tuple[slice, slice, torch.Tensor], ...],
                             tuple[tuple[int, int, int], ...], torch.Tensor]:
        """(A_allᵀ [in, K], ((T columns, y columns, B_all,i [K_i, out_i]) per slice), layout, B_bd): the
        live slots' A side by side, slice-major ((slot, c0, c1) per slice and slot: the columns of T that
        are that slot's), per slice the matching B rows stacked, so no expand multiplies a zero block, and
        all of them as one block-diagonal [K, width] matrix (one expand for a few rows)."""
        if self._dense is None:
            a_parts, layout, parts = [], [], []
            k = 0
            for i, yc in enumerate(self.cols):
                k_i, b_parts = k, []
                for s in sorted(self.live or ()):
                    for kc, yc2 in self.blocks[s]:
                        if yc2 == yc:
                            a_parts.append(self.a_t[s][:, kc].t())
                            b_parts.append(self.b_bd[s][kc, yc])
                            layout.append((s, k, k + kc.stop - kc.start))
                            k += kc.stop - kc.start
                if b_parts:
                    parts.append((slice(k_i, k), yc, torch.cat(b_parts, dim=0)))
            a0 = a_parts[0]
            b_bd = torch.zeros((k, self.width), dtype=a0.dtype, device=a0.device)
            for tc, yc, b_all in parts:
                b_bd[tc, yc] = b_all
            self._dense = (torch.cat(a_parts, dim=0).t(), tuple(parts), tuple(layout), b_bd)
        return self._dense


def _versions(ts: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in ts)
    except RuntimeError:  # inference tensors have no version counter
        return None


def live_slots(b: torch.Tensor, cache: dict[int, tuple[tuple[int, ...], frozenset[int]]]) -> frozenset[int] | None:
    """The slots of a stacked LoRA weight ``[slots, ...]`` that are not all zero, recomputed only when the stack
    was written (version counter; `cache` is the caller's, keyed by data pointer). None: no version counter
    to cache by (inference tensors) — the caller assumes every slot may hold weights."""
    v = _versions((b,))
    if v is None:
        return None
    ent = cache.get(b.data_ptr())
    if ent is None or ent[0] != v:  # one pass over the stack (one device read on a GPU) per load / unload
        with torch.no_grad():
            live = frozenset(i for i, nz in enumerate((b.reshape(b.shape[0], -1) != 0).any(dim=1).tolist()) if nz)
        ent = cache[b.data_ptr()] = (v, live)
    return ent[1]
