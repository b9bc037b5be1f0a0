"""Per-step LoRA metadata built on the host, for peftdeploy's CUDA punica wrapper.

vLLM's ``PunicaWrapperGPU.update_metadata`` hands its *device* copy of the token→slot mapping to
``LoRAKernelMeta.prepare_tensors``, which reads it back (``no_lora`` flag, ``torch.unique`` sizes):
two GPU→CPU synchronisations per step (vLLM marks them "TODO avoid gpu<->cpu sync here"; vLLM PR
#53309 is the upstream fix). Under vLLM's asynchronous scheduling such a sync stalls the host until
the previous step's forward has finished, so the next step's preparation no longer overlaps it.

The mapping starts as Python data (``LoRAMapping.index_mapping``), so everything can be built on the
host: the same ``LoRAKernelMeta`` fields vLLM's kernels read (sorted token indices, active slots,
counts, start offsets, the no-LoRA flag and the active count) and, for peftdeploy's kernels, *tile
tables*: for each tile height ``bm`` a list of tiles (adapter slot, rows, and the token index of each
row) so a kernel program needs one round of loads before its data loads. All of it is written into
one pinned host buffer and sent with one asynchronous copy into one device buffer whose views
replace the ``LoRAKernelMeta`` tensors (same shapes and dtypes; addresses fixed before any CUDA graph
is captured). A small ring of pinned buffers, each guarded by an event, keeps the host from
rewriting a buffer whose copy has not run yet.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
import torch

TILE_BMS = (16, 32, 64, 128)  # tile heights the kernels' launch configurations may use
RING = 4


def slots_of(lora_ids: Sequence[int], lora_index_to_id: Sequence[int | None]) -> np.ndarray:
    """Adapter slot per entry of a vLLM mapping (int LoRA ids, 0 = none) as int32; -1 = no adapter.

    Same mapping as vLLM's ``convert_mapping`` (a LoRA id not in a slot is an error there too)."""
    arr = np.asarray(lora_ids, dtype=np.int64)
    if arr.size == 0:
        return np.empty(0, dtype=np.int32)
    id2slot = {i: s for s, i in enumerate(lora_index_to_id) if i is not None}
    uniq, inv = np.unique(arr, return_inverse=True)
    lut = np.array([id2slot[int(u)] if u > 0 else -1 for u in uniq], dtype=np.int32)
    return lut[inv.reshape(-1)]


def tile_capacity(max_tokens: int, nl: int, bm: int) -> int:
    """Most tiles of height `bm` a step of up to `max_tokens` tokens over `nl` slot groups can have."""
    return -(-max_tokens // bm) + nl


BASE_TILE = -2  # slot of a tile of tokens without an adapter (-1: an unused entry)


def table_size(cap: int, bm: int) -> int:
    """int32 elements of one tile table of `cap` tiles of height `bm`."""
    return cap * (2 + bm) + 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """Offsets (in int32 elements) of every field in the one metadata buffer."""

    max_tokens: int
    nl: int  # slot groups: max_loras + 1 (the no-adapter group)
    fields: dict[str, tuple[int, int]]  # name -> (offset, length)
    # bm -> (offset, capacity); table = [slot(cap) | rows(cap) | tok(cap*bm) | tokens mapped this step (1)]
    tiles: dict[int, tuple[int, int]]
    size: int

    @staticmethod
    def make(max_tokens: int, max_loras: int, metas: Iterable[str] = ("token", "prompt"),
             bms: Sequence[int] = TILE_BMS) -> "Layout":
        nl = max_loras + 1
        fields: dict[str, tuple[int, int]] = {}
        off = 0
        for m in metas:
            for name, n in (("mapping", max_tokens), ("sorted", max_tokens), ("ids", nl), ("counts", nl),
                            ("start", nl + 1)):
                fields[f"{m}.{name}"] = (off, n)
                off += n
        tiles: dict[int, tuple[int, int]] = {}
        for bm in bms:
            cap = tile_capacity(max_tokens, nl, bm)
            tiles[bm] = (off, cap)
            off += table_size(cap, bm)
        return Layout(max_tokens, nl, fields, tiles, off)


def group(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token indices sorted by slot (stable), slot ids ascending (-1 first when present), counts):
    what vLLM's prepare_tensors gets from torch.sort(stable) and torch.unique(return_counts)."""
    order = np.argsort(slots, kind="stable").astype(np.int32)
    ids, counts = np.unique(slots, return_counts=True)
    return order, ids.astype(np.int32), counts.astype(np.int32)


def fill_meta(buf: np.ndarray, lay: Layout, prefix: str, slots: np.ndarray,
              grouped: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Write one LoRAKernelMeta's fields exactly as vLLM's prepare_tensors leaves them."""
    t = slots.size
    order, ids, counts = grouped

    def f(name: str) -> np.ndarray:
        o, n = lay.fields[f"{prefix}.{name}"]
        return buf[o:o + n]

    f("mapping")[:t] = slots
    f("sorted")[:t] = order
    f("ids")[:] = -1
    f("counts")[:] = 0
    f("start")[:] = 0
    if (slots == -1).all():
        return  # vLLM's no-LoRA early exit leaves the reset values
    f("ids")[: ids.size] = ids
    f("counts")[: counts.size] = counts
    f("start")[1: 1 + counts.size] = np.cumsum(counts)


def fill_tiles(buf: np.ndarray, lay: Layout, grouped: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Tile tables of every height: tile i = up to bm tokens of one adapter slot; after the adapters' tiles,
    the tiles of the tokens without an adapter (slot BASE_TILE: only the GEMM-fused kernel, which writes
    every row, reads them); last, how many tokens the step maps (rows past it are CUDA-graph padding)."""
    order, ids, counts = grouped
    starts = np.concatenate(([0], np.cumsum(counts)))
    base_last = [(i, c, s) for i, c, s in zip(ids, counts, starts[:-1]) if i < 0]
    groups = [(i, c, s) for i, c, s in zip(ids, counts, starts[:-1]) if i >= 0] + base_last
    for bm, (off, cap) in lay.tiles.items():
        slot_t = buf[off:off + cap]
        rows_t = buf[off + cap:off + 2 * cap]
        tok_t = buf[off + 2 * cap:off + cap * (2 + bm)].reshape(cap, bm)
        slot_t[:] = -1
        buf[off + cap * (2 + bm)] = int(order.size)
        i = 0
        for lid, c, s in groups:
            if c == 0:
                continue
            nt = -(-int(c) // bm)
            slot_t[i:i + nt] = lid if lid >= 0 else BASE_TILE
            rows_t[i:i + nt] = np.minimum(bm, c - bm * np.arange(nt))
            seg = np.zeros(nt * bm, dtype=np.int32)
            seg[:c] = order[s:s + c]
            tok_t[i:i + nt] = seg.reshape(nt, bm)
            i += nt


class StepMetadata:
    """The wrapper's per-step metadata: host-built, one async copy, views in place of vLLM's tensors."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device | str,
                 metas: dict[str, Any]):
        self.layout = Layout.make(max_tokens, max_loras, metas)
        self.device = torch.device(device)
        self.metas = metas  # "token" / "prompt" -> vLLM LoRAKernelMeta
        self.dev = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        pin = self.device.type == "cuda"
        self.host = [torch.zeros(self.layout.size, dtype=torch.int32, pin_memory=pin) for _ in range(RING if pin else 1)]
        self.events = [torch.cuda.Event() if pin else None for _ in self.host]
        self.used = [False] * len(self.host)
        self.step = 0
        for prefix, meta in metas.items():
            for attr, name in (("token_lora_mapping", "mapping"), ("token_indices_sorted_by_lora_ids", "sorted"),
                               ("active_lora_ids", "ids"), ("num_tokens_per_lora", "counts"),
                               ("lora_token_start_loc", "start")):
                o, n = self.layout.fields[f"{prefix}.{name}"]
                old = getattr(meta, attr)
                if old.numel() != n or old.dtype != torch.int32:
                    raise ValueError(f"vLLM's LoRAKernelMeta.{attr} is {tuple(old.shape)} {old.dtype}, "
                                     f"expected ({n},) int32")
                setattr(meta, attr, self.dev[o:o + n])
        self.tiles = [self.dev[o:o + table_size(cap, bm)] for bm, (o, cap) in self.layout.tiles.items()]

    def update(self, slots: dict[str, np.ndarray]) -> None:
        """Fill every meta (and the tile tables from the "token" mapping) for this step; one H2D copy."""
        k = self.step % len(self.host)
        self.step += 1
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self.used[k] and self.events[k] is not None and not capturing:
            self.events[k].synchronize()  # the copy from this buffer RING steps ago has run
        h = self.host[k]
        buf = h.numpy()
        for prefix, meta in self.metas.items():
            s = slots[prefix]
            g = group(s)
            fill_meta(buf, self.layout, prefix, s, g)
            if prefix == "token":
                fill_tiles(buf, self.layout, g)
            _set_flags(meta, s, g[1])
        self.dev.copy_(h, non_blocking=True)
        if self.events[k] is not None and not capturing:
            self.events[k].record()
            self.used[k] = True


def _set_flags(meta: Any, slots: np.ndarray, ids: np.ndarray) -> None:
    """The CPU-side flags of a LoRAKernelMeta, as prepare_tensors sets them (no device read)."""
    no_lora = bool((slots == -1).all())
    meta.no_lora_flag_cpu[0] = no_lora
    n = 0 if no_lora else int(ids.size)
    counts = getattr(meta, "captured_lora_counts", None)
    if counts and n > 0:
        i = bisect.bisect_left(counts, n)
        if i < len(counts):
            n = counts[i]
    if hasattr(meta, "num_active_loras_cpu"):
        meta.num_active_loras_cpu[0] = n
