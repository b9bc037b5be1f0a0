"""peftdeploy's Triton kernels for multi-LoRA linear layers (CUDA; CPU under ``TRITON_INTERPRET=1``).

One call applies, for every token ``t`` whose adapter slot is ``l = slot[t] >= 0`` and every slice ``s``
of a (possibly packed: qkv, gate_up) linear layer::

    y[t, col_s : col_s + N_s] += ((x[t] @ A_s[l]^T) * scale) @ B_s[l]^T

with ``A_s`` of shape ``[max_loras, 1, R, K]`` and ``B_s`` ``[max_loras, 1, N_s, R]`` (vLLM's stacked LoRA
weights, used in place). Tokens without an adapter cost nothing: the grid walks *tiles*, each a block
of up to ``BM`` tokens of one adapter, found in-kernel from vLLM's per-step token grouping
(``LoRAKernelMeta``: tokens sorted by slot, tokens per slot, segment starts, active slot ids), so the
launch is CUDA-graph safe (grid fixed by the token count) and spare programs exit at once.

Two schedules, chosen per layer shape and token count (`choose_config`):

* ``fused`` — one launch: a program owns a tile and a chunk of output columns of one slice, computes
  its tile's rank-R intermediate ``h = x·Aᵀ`` in registers (fp32), then ``y += h·Bᵀ`` over its chunk.
  No scratch memory, no zeroing. Re-reads x and A per column chunk (from L2): best when K is small
  relative to the columns per program.
* ``split`` — two launches: a shrink over all slices at once with the K dimension split across programs
  (each writes its own fp32 partial, no atomics, nothing to zero), then an expand that sums the
  partials of its tile (a few KiB) and applies ``B`` — best for decode batches with a large K
  (down_proj), where one program per tile could not pull A fast enough.

Both are deterministic (no atomics) and round like vLLM's kernels: fp32 accumulation, the
intermediate cast to the weights' dtype before ``B``, the sum with ``y`` in fp32.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

MAX_SLICES = 3
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_RANK = 128


@triton.jit
def _tile(pid, cnt_ptr, lid_ptr, start_ptr, NL, BM: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile `pid` of this step -> (valid, slot's adapter index, its token count, its first sorted token, m0)."""
    offs_l = tl.arange(0, BLOCK_L)
    in_l = offs_l < NL
    lid = tl.load(lid_ptr + offs_l, mask=in_l, other=-1)
    cnt = tl.load(cnt_ptr + offs_l, mask=in_l, other=0)
    cnt = tl.where(lid >= 0, cnt, 0)
    nt = (cnt + BM - 1) // BM
    cum = tl.cumsum(nt, axis=0)
    total = tl.sum(nt, axis=0)
    slot = tl.sum((cum <= pid).to(tl.int32), axis=0)
    before = tl.sum(tl.where(offs_l < slot, nt, 0), axis=0)
    lora = tl.sum(tl.where(offs_l == slot, lid, 0), axis=0)
    n_tok = tl.sum(tl.where(offs_l == slot, cnt, 0), axis=0)
    start = tl.load(start_ptr + slot, mask=pid < total, other=0)
    m0 = (pid - before) * BM
    return pid < total, lora, n_tok, start, m0


@triton.jit
def _shrink_acc(acc, x_ptr, a_ptr, rows, m_ok, offs_r, r_ok, k_lo, k_hi, K, stride_xm, R: tl.constexpr,
                BK: tl.constexpr):
    """acc[BM, BLOCK_R] += x[rows, k_lo:k_hi] @ A[:, k_lo:k_hi]^T (A: [R, K] rows of one adapter slice)."""
    for k in range(k_lo, k_hi, BK):
        offs_k = k + tl.arange(0, BK)
        k_ok = offs_k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(xt, at)
    return acc


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, a_off_ptr, p_ptr, sorted_ptr, cnt_ptr, start_ptr, lid_ptr,
                   T, K, NL, stride_xm, scale,
                   R: tl.constexpr, BLOCK_R: tl.constexpr, S: tl.constexpr, SPLIT_K: tl.constexpr,
                   KC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_L: tl.constexpr):
    """p[j, s, t, :] = (x[t, Kj] @ A_s[slot t][:, Kj]^T) * scale for the tokens of one tile, all slices."""
    valid, lora, n_tok, start, m0 = _tile(tl.program_id(0), cnt_ptr, lid_ptr, start_ptr, NL, BM, BLOCK_L)
    if valid:
        j = tl.program_id(1)
        offs_m = tl.arange(0, BM)
        m_ok = m0 + offs_m < n_tok
        rows = tl.load(sorted_ptr + start + m0 + offs_m, mask=m_ok, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        k_lo = j * KC
        k_hi = tl.minimum(k_lo + KC, K)
        lora_base = a_ptr + lora.to(tl.int64) * R * K
        for s in tl.static_range(S):
            a_s = lora_base + tl.load(a_off_ptr + s)
            acc = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
            acc = _shrink_acc(acc, x_ptr, a_s, rows, m_ok, offs_r, r_ok, k_lo, k_hi, K, stride_xm, R, BK)
            pp = p_ptr + ((j * S + s) * T + rows[:, None]) * BLOCK_R + offs_r[None, :]
            tl.store(pp, acc * scale, mask=m_ok[:, None])


@triton.jit
def _expand_kernel(y_ptr, x_ptr, a_ptr, a_off_ptr, b_ptr, b_off_ptr, p_ptr, sorted_ptr, cnt_ptr, start_ptr,
                   lid_ptr, T, K, NL, stride_xm, stride_ym, scale,
                   N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
                   BLOCK_R: tl.constexpr, S: tl.constexpr, SPLIT_K: tl.constexpr, FUSED: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, N_ITERS: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """y[t, cols of one chunk of slice s] += h_s[t] @ B_s[slot t][chunk]^T for the tokens of one tile."""
    valid, lora, n_tok, start, m0 = _tile(tl.program_id(0), cnt_ptr, lid_ptr, start_ptr, NL, BM, BLOCK_L)
    if valid:
        pid_c = tl.program_id(1)
        CH: tl.constexpr = BN * N_ITERS
        C0: tl.constexpr = (N0 + CH - 1) // CH
        C1: tl.constexpr = (N1 + CH - 1) // CH
        s = (pid_c >= C0).to(tl.int32) + (pid_c >= C0 + C1).to(tl.int32)
        first = tl.where(s == 0, 0, tl.where(s == 1, C0, C0 + C1))
        n_s = tl.where(s == 0, N0, tl.where(s == 1, N1, N2))
        col0 = tl.where(s == 0, 0, tl.where(s == 1, N0, N0 + N1))
        n_lo = (pid_c - first) * CH
        offs_m = tl.arange(0, BM)
        m_ok = m0 + offs_m < n_tok
        rows = tl.load(sorted_ptr + start + m0 + offs_m, mask=m_ok, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        if FUSED:
            a_s = a_ptr + lora.to(tl.int64) * R * K + tl.load(a_off_ptr + s)
            h = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
            h = _shrink_acc(h, x_ptr, a_s, rows, m_ok, offs_r, r_ok, 0, K, K, stride_xm, R, BK) * scale
        else:
            h = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                pp = p_ptr + ((j * S + s) * T + rows[:, None]) * BLOCK_R + offs_r[None, :]
                h += tl.load(pp, mask=m_ok[:, None], other=0.0)
        h = h.to(y_ptr.dtype.element_ty)
        b_s = b_ptr + tl.load(b_off_ptr + s) + lora.to(tl.int64) * n_s * R
        for it in tl.static_range(N_ITERS):
            offs_n = n_lo + it * BN + tl.arange(0, BN)
            n_ok = offs_n < n_s
            bt = tl.load(b_s + offs_n[None, :] * R + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
            acc = tl.dot(h, bt)
            yp = y_ptr + rows[:, None] * stride_ym + (col0 + offs_n)[None, :]
            ym = m_ok[:, None] & n_ok[None, :]
            yt = tl.load(yp, mask=ym, other=0.0)
            tl.store(yp, (yt.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ym)


# ------------------------------------------------------------------------------------------ host side
@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration. `fused`: one launch (see module docstring); else shrink + expand."""

    fused: bool
    bm: int
    bn: int
    bk: int
    n_iters: int = 1
    split_k: int = 1
    warps: int = 4
    stages: int = 2


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _overrides() -> dict[str, Config]:
    """PEFTDEPLOY_LORA_KERNEL_CONFIG: a JSON object {"<config_key>": {Config fields}}, or the path of a file
    holding one (what scripts/gpu_lora_kernels.py --sweep writes). For tuning and benchmarks."""
    raw = os.environ.get("PEFTDEPLOY_LORA_KERNEL_CONFIG", "").strip()
    if not raw:
        return {}
    if not raw.startswith("{"):
        with open(raw) as f:
            raw = f.read()
    return {k: Config(**v) for k, v in json.loads(raw).items()}


_OVERRIDES: dict[str, Config] | None = None


TOKEN_BUCKETS = (16, 64, 256, 1024)  # CUDA-graph batch sizes fall in these; larger = "big"


def token_bucket(tokens: int) -> str:
    for b in TOKEN_BUCKETS:
        if tokens <= b:
            return f"t{b}"
    return "tbig"


def config_key(tokens: int, k: int, widths: Sequence[int], rank: int) -> str:
    return f"{token_bucket(tokens)}:k{k}:n{'+'.join(str(w) for w in widths)}:r{rank}"


def default_config(tokens: int, k: int, widths: Sequence[int], rank: int) -> Config:
    """Launch configuration for shapes `TUNED` does not list: the pattern the H200 sweep found for the
    Llama-3-8B shapes (docs/bench/gpu-kernels/), generalised by K and the number of slices."""
    if tokens <= 256:  # decode: few tokens per adapter; parallelism must come from K and N
        split = 16 if (k >= 8192 or len(widths) > 1) else 8
        split = max(1, min(split, k // 256))
        return Config(fused=False, bm=16 if tokens <= 64 else 32, bn=128, bk=128, n_iters=1, split_k=split)
    return Config(fused=False, bm=64, bn=128, bk=128, n_iters=1, split_k=2 if k >= 1024 else 1)


def _tuned() -> dict[str, Config]:
    """The configurations measured fastest on an H200 per token bucket and layer shape
    (scripts/gpu_lora_kernels.py --sweep, shipped as peftdeploy/data/lora_kernels/tuned-h200.json)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "data", "lora_kernels",
                        "tuned-h200.json")
    try:
        with open(path) as f:
            return {k: Config(**v) for k, v in json.load(f).items()}
    except (OSError, ValueError, TypeError):
        return {}


TUNED: dict[str, Config] = _tuned()


def choose_config(tokens: int, k: int, widths: Sequence[int], rank: int) -> Config:
    """The launch configuration for a layer shape and a token count (static per CUDA graph)."""
    global _OVERRIDES
    if _OVERRIDES is None:
        _OVERRIDES = _overrides()
    key = config_key(tokens, k, widths, rank)
    hit = _OVERRIDES.get(key) or TUNED.get(key)
    return hit if hit is not None else default_config(tokens, k, widths, rank)


_OFFSETS: dict[tuple[int, ...], torch.Tensor] = {}


def _offsets(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element offsets of each slice's weight tensor from the first one's (cached: vLLM's stacks persist)."""
    key = tuple(t.data_ptr() for t in ts)
    hit = _OFFSETS.get(key)
    if hit is None:
        es = ts[0].element_size()
        offs = []
        for t in ts:
            d = t.data_ptr() - ts[0].data_ptr()
            if d % es:
                raise ValueError("LoRA weight slices are not element-aligned")
            offs.append(d // es)
        offs += [0] * (MAX_SLICES - len(offs))
        hit = torch.tensor(offs, dtype=torch.int64, device=ts[0].device)
        _OFFSETS[key] = hit
    return hit


def unsupported(x: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> str | None:
    """Why these inputs cannot take the peftdeploy kernels (None when they can). Static properties only."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (peftdeploy's Triton kernels take float16/bfloat16)"
    if not 1 <= len(a) <= MAX_SLICES or len(a) != len(b):
        return f"{len(a)} slices (at most {MAX_SLICES})"
    r = a[0].shape[-2]
    if r > MAX_RANK:
        return f"rank {r} > {MAX_RANK}"
    for t in (*a, *b):
        if t.dtype != x.dtype:
            return f"LoRA weights in {t.dtype} with activations in {x.dtype}"
        if not t.is_contiguous():
            return "non-contiguous LoRA weight stacks"
    for t in a:
        if t.shape[-2:] != a[0].shape[-2:]:
            return "slices with different A shapes"
    for t in b:
        if t.shape[-1] != r:
            return "B rank differs from A rank"
    return None


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                sorted_tokens: torch.Tensor, tokens_per_slot: torch.Tensor, slot_start: torch.Tensor,
                slot_ids: torch.Tensor, scale: float = 1.0, config: Config | None = None) -> None:
    """In place: y[t, slice cols] += x[t] @ A_s[slot]^T @ B_s[slot]^T * scale for tokens with a slot.

    `sorted_tokens` [T] (token indices grouped by slot), `tokens_per_slot` [NL], `slot_start` [NL+1]
    (first sorted index of each group), `slot_ids` [NL] (adapter slot of each group, -1 = no adapter):
    vLLM's `LoRAKernelMeta` tensors (``token_indices_sorted_by_lora_ids``, ``num_tokens_per_lora``,
    ``lora_token_start_loc``, ``active_lora_ids``). x: [T, K]; y: [T, ΣN_s], row stride free, unit
    column stride.
    """
    T, K = x.shape
    if T == 0:
        return
    S = len(lora_a)
    R = lora_a[0].shape[-2]
    widths = [int(t.shape[-2]) for t in lora_b]
    assert y.shape[0] >= T and y.stride(-1) == 1 and x.stride(-1) == 1
    assert y.shape[-1] == sum(widths), (y.shape, widths)
    cfg = config or choose_config(T, K, widths, R)
    NL = int(slot_ids.shape[0])
    BLOCK_L = max(16, _pow2(NL))
    BLOCK_R = max(16, _pow2(R))
    a_off, b_off = _offsets(lora_a), _offsets(lora_b)
    n = widths + [0] * (MAX_SLICES - S)
    ch = cfg.bn * cfg.n_iters
    chunks = sum(-(-w // ch) for w in widths)
    tiles = -(-T // cfg.bm) + NL
    meta = (sorted_tokens, tokens_per_slot, slot_start, slot_ids)
    if cfg.fused:
        _expand_kernel[(tiles, chunks)](
            y, x, lora_a[0], a_off, lora_b[0], b_off, x, *meta, T, K, NL, x.stride(0), y.stride(0), scale,
            N0=n[0], N1=n[1], N2=n[2], R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=1, FUSED=True, BM=cfg.bm, BN=cfg.bn,
            BK=cfg.bk, N_ITERS=cfg.n_iters, BLOCK_L=BLOCK_L, num_warps=cfg.warps, num_stages=cfg.stages)
        return
    kc = -(-(-(-K // cfg.split_k)) // cfg.bk) * cfg.bk
    split = -(-K // kc)
    p = torch.empty((split, S, T, BLOCK_R), dtype=torch.float32, device=x.device)
    _shrink_kernel[(tiles, split)](
        x, lora_a[0], a_off, p, *meta, T, K, NL, x.stride(0), scale,
        R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=split, KC=kc, BM=cfg.bm, BK=cfg.bk, BLOCK_L=BLOCK_L,
        num_warps=cfg.warps, num_stages=cfg.stages)
    _expand_kernel[(tiles, chunks)](
        y, x, lora_a[0], a_off, lora_b[0], b_off, p, *meta, T, K, NL, x.stride(0), y.stride(0), scale,
        N0=n[0], N1=n[1], N2=n[2], R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=split, FUSED=False, BM=cfg.bm, BN=cfg.bn,
        BK=cfg.bk, N_ITERS=cfg.n_iters, BLOCK_L=BLOCK_L, num_warps=cfg.warps, num_stages=cfg.stages)


def make_meta(slots: torch.Tensor, max_loras: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's LoRAKernelMeta tensors for a token->slot mapping (tests, benchmarks; vLLM builds its own)."""
    dev = slots.device
    order = torch.sort(slots, stable=True).indices.to(torch.int32)
    ids, counts = torch.unique(slots, sorted=True, return_counts=True)
    nl = max_loras + 1
    slot_ids = torch.full((nl,), -1, dtype=torch.int32, device=dev)
    per = torch.zeros(nl, dtype=torch.int32, device=dev)
    start = torch.zeros(nl + 1, dtype=torch.int32, device=dev)
    slot_ids[: ids.numel()] = ids.to(torch.int32)
    per[: counts.numel()] = counts.to(torch.int32)
    start[1: 1 + counts.numel()] = torch.cumsum(counts, 0).to(torch.int32)
    return order, per, start, slot_ids


def reference(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
              slots: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """float64 reference of `lora_linear` (returns a new float64 tensor)."""
    out = y.double().clone()
    xd = x.double()
    col = 0
    for a, b in zip(lora_a, lora_b):
        w = b.shape[-2]
        for t in range(x.shape[0]):
            s = int(slots[t])
            if s < 0:
                continue
            h = (xd[t] @ a[s, 0].double().T) * scale
            out[t, col:col + w] += h @ b[s, 0].double().T
        col += w
    return out
