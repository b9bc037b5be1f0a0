"""Which rows of a step each LoRA layer computes, grouped by adapter slot (peftdeploy's CPU kernels, cpu.py).

`_Step` run-length encodes one step's token -> LoRA id mapping once (`_runs`); `_Grouping` turns it,
per set of live slots of a layer, into row ranges (views of x / y), a dense set of interleaved rows, or
rows gathered per slot — whichever needs the fewest torch ops.
"""
from __future__ import annotations

from typing import Any

import torch

# Runs of at least this many tokens of one slot (prefill chunks) are always used as views of x / y: the
# GEMMs are large enough that FLOPs, not op count, decide. Shorter runs (decode tokens) go the way with
# the fewest torch ops: views (2 per run), gathered (2 + 2 per slot) or dense (3, +2 with base rows).
_MIN_VIEW_RUN = 32
# Below this many rows a packed layer (qkv, gate_up) expands with one GEMM over its block-diagonal B
# (a few wasted FLOPs, one op); at or above, one GEMM per slice (no wasted FLOPs).
_BLOCK_DIAG_ROWS = 64
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
    """The tokens of one step that a layer must compute, grouped by adapter slot.

    Built once per step and per set of ``live`` slots (the slots whose weights in a layer are not all
    zero: an adapter that targets q/v only has zero o/gate_up/down stacks, vLLM fills them with zeros,
    so its tokens skip those layers; ``None`` = every slot). Tokens without an adapter (-1) or of a
    dead slot are in no group.

    ``views``: ((slot, start, end), ...) row ranges of x / y themselves. The other tokens (``index``,
    sorted by position for ``dense``, by slot for ``gathered``) go one of two ways:

    * ``dense``: one shrink of those rows against every live slot of the layer side by side, the rank
      blocks of the other slots zeroed by `mask` (1 for a row's own slot), one expand over the stacked
      B; three ops per layer whatever the number of adapters (decode batches of interleaved adapters);
    * ``gathered``: ((slot, start, end), ...) row ranges of ``x.index_select(0, index)``, one shrink +
      expand per slot (few of many slots in use).
    """

    __slots__ = ("views", "gathered", "index", "ntok", "empty", "error", "dense", "dense_rows", "all_rows",
                 "slot_of_row", "_masks")

    def __init__(self, index_mapping: tuple[int, ...], lora_index_to_id: list[int | None],
                 device: torch.device | str, live: frozenset[int] | None = None, dense_ok: bool = True,
                 runs: list[tuple[int, int, int]] | None = None) -> None:
        self.ntok = len(index_mapping)
        self.views: tuple[tuple[int, int, int], ...] = ()
        self.gathered: tuple[tuple[int, int, int], ...] = ()
        self.index: torch.Tensor | None = None
        self.error = ""
        self.dense = False
        self.dense_rows = 0
        self.all_rows = False
        self.slot_of_row: list[int] = []
        self._masks: dict[Any, torch.Tensor] = {}
        if runs is None:
            runs = _runs(index_mapping)
        id_to_slot = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        views: list[tuple[int, int, int]] = []
        short: list[tuple[int, int, int]] = []  # (start, end, slot)
        for lid, s, e in runs:
            slot = id_to_slot.get(lid)
            if slot is None:
                self.error = f"LoRA id {lid} of the batch is in no slot {list(lora_index_to_id)}"
                self.empty = False
                return
            if live is not None and slot not in live:
                continue
            if e - s >= _MIN_VIEW_RUN:
                views.append((slot, s, e))
            else:
                short.append((s, e, slot))
        self.empty = not views and not short
        if short:
            nrows = sum(e - s for s, e, _ in short)
            slots = sorted({slot for _, _, slot in short})
            all_rows = nrows == self.ntok
            cost_views = 2 * len(short)
            cost_gather = 2 + 2 * len(slots)
            # dense: every row against every live slot; only while that is not much more than in use
            n_live = len(live) if live is not None else len(lora_index_to_id)
            cost_dense = 3 + (0 if all_rows else 2) if dense_ok and n_live <= 2 * len(slots) else 1 << 30
            best = min(cost_views, cost_gather, cost_dense)
            if best == cost_views:
                views.extend((slot, s, e) for s, e, slot in short)
            elif best == cost_dense:
                self.dense = True
                rows: list[int] = []
                for s, e, slot in sorted(short):
                    rows.extend(range(s, e))
                    self.slot_of_row.extend([slot] * (e - s))
                self.dense_rows = len(rows)
                self.all_rows = all_rows
                if not all_rows:
                    self.index = torch.tensor(rows, dtype=torch.long, device=device)
            else:
                rows = []
                gathered: list[tuple[int, int, int]] = []
                for slot in slots:
                    g0 = len(rows)
                    for s, e, sl in short:
                        if sl == slot:
                            rows.extend(range(s, e))
                    gathered.append((slot, g0, len(rows)))
                self.gathered = tuple(gathered)
                self.index = torch.tensor(rows, dtype=torch.long, device=device)
        self.views = tuple(sorted(views))

    def mask(self, layout: tuple[tuple[int, int, int], ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
        """[dense rows, K]: 1 in the columns that ``layout`` ((slot, c0, c1), ...) gives the row's own slot."""
        key = (layout, dtype)
        m = self._masks.get(key)
        if m is None:
            width = max((c1 for _, _, c1 in layout), default=0)
            m = torch.zeros((self.dense_rows, width), dtype=dtype, device=device)
            sor = torch.tensor(self.slot_of_row, dtype=torch.long, device=device)
            for slot, c0, c1 in layout:
                m[:, c0:c1] = (sor == slot).to(dtype).unsqueeze(1)
            self._masks[key] = m
        return m


class _Step:
    """One step's token -> LoRA id mapping, run-length encoded once; its groupings per set of live slots."""

    __slots__ = ("mapping", "l2i", "device", "runs", "_cache")

    def __init__(self, mapping: tuple[int, ...], lora_index_to_id: list[int | None], device: Any) -> None:
        self.mapping, self.l2i, self.device = mapping, list(lora_index_to_id), device
        self.runs = _runs(mapping)
        self._cache: dict[tuple[frozenset[int] | None, bool], _Grouping] = {}

    def group(self, live: frozenset[int] | None, dense_ok: bool = True) -> _Grouping:
        g = self._cache.get((live, dense_ok))
        if g is None:
            g = self._cache[(live, dense_ok)] = _Grouping(self.mapping, self.l2i, self.device, live, dense_ok,
                                                          self.runs)
        return g
