"""peftdeploy's Triton kernels for multi-LoRA linear layers (CUDA; CPU under ``TRITON_INTERPRET=1``).

One call applies, for every token ``t`` whose adapter slot is ``l = slot[t] >= 0`` and every slice ``s``
of a (possibly packed: qkv, gate_up) linear layer::

    y[t, col_s : col_s + N_s] += ((x[t] @ A_s[l]^T) * scale) @ B_s[l]^T

with ``A_s`` of shape ``[max_loras, 1, R, K]`` and ``B_s`` ``[max_loras, 1, N_s, R]`` (vLLM's stacked LoRA
weights, used in place). Tokens without an adapter cost nothing: the grid walks *tiles*, each up to
``BM`` tokens of one adapter, read from a tile table the wrapper builds on the host once per step
(`step_meta.py`: slot, row count and the token index of every row, so a program needs one round of
independent loads before it loads x), so the launch is CUDA-graph safe (grid fixed by the token
count) and spare programs exit at once.

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
import math
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import step_meta
from .step_meta import TILE_BMS

MAX_SLICES = 3
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_RANK = 128
COMBINE_MAX = 8192  # accumulator elements per program above which the shrink loops over slices instead


@triton.jit
def _tile(pid, tiles_ptr, CAP, BM: tl.constexpr):
    """Tile `pid` of this step's tile table -> (valid, adapter slot, row mask, token index per row).

    One round of independent loads (the table is built on the host per step: step_meta.py)."""
    lora = tl.load(tiles_ptr + pid)
    n_rows = tl.load(tiles_ptr + CAP + pid)
    offs_m = tl.arange(0, BM)
    rows = tl.load(tiles_ptr + 2 * CAP + pid.to(tl.int64) * BM + offs_m).to(tl.int64)
    return lora >= 0, lora, offs_m < n_rows, rows


@triton.jit
def _chunk(pid_c, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, CH: tl.constexpr):
    """Column chunk `pid_c` (CH columns each, slices one after the other) -> (slice, its width, its first
    column in y, the chunk's first column within the slice)."""
    C0: tl.constexpr = (N0 + CH - 1) // CH
    C1: tl.constexpr = (N1 + CH - 1) // CH
    s = (pid_c >= C0).to(tl.int32) + (pid_c >= C0 + C1).to(tl.int32)
    first = tl.where(s == 0, 0, tl.where(s == 1, C0, C0 + C1))
    n_s = tl.where(s == 0, N0, tl.where(s == 1, N1, N2))
    col0 = tl.where(s == 0, 0, tl.where(s == 1, N0, N0 + N1))
    return s, n_s, col0, (pid_c - first) * CH


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
def _shrink_kernel(x_ptr, a_ptr, a_off_ptr, p_ptr, tiles_ptr, CAP, T, K, stride_xm, scale, kc_rt,
                   R: tl.constexpr, BLOCK_R: tl.constexpr, S: tl.constexpr, SPLIT_K: tl.constexpr,
                   KC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, COMBINE: tl.constexpr,
                   BLOCK_SR: tl.constexpr):
    """p[j, s, t, :] = (x[t, Kj] @ A_s[slot t][:, Kj]^T) * scale for the tokens of one tile, all slices.

    COMBINE: the slices' A rows side by side as the columns of one [BK, S*R] operand, so each x tile is
    loaded once for all slices (qkv, gate_up) and one K loop runs instead of S."""
    valid, lora, m_ok, rows = _tile(tl.program_id(0), tiles_ptr, CAP, BM)
    if valid:
        j = tl.program_id(1)
        if KC > 0:
            k_lo = j * KC
            k_hi = tl.minimum(k_lo + KC, K)
        else:  # prefill: the K chunk is a runtime value (one compiled kernel for every step size)
            k_lo = j * kc_rt
            k_hi = tl.minimum(k_lo + kc_rt, K)
        lora_off = lora.to(tl.int64) * R * K
        if COMBINE:
            offs_c = tl.arange(0, BLOCK_SR)
            s_c = offs_c // BLOCK_R
            r_c = offs_c % BLOCK_R
            in_s = s_c < S
            c_ok = in_s & (r_c < R)
            col = tl.load(a_off_ptr + s_c, mask=in_s, other=0) + lora_off + r_c.to(tl.int64) * K
            acc = tl.zeros((BM, BLOCK_SR), dtype=tl.float32)
            for k in range(k_lo, k_hi, BK):
                offs_k = k + tl.arange(0, BK)
                k_ok = offs_k < k_hi
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                             mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                at = tl.load(a_ptr + col[None, :] + offs_k[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.0)
                acc += tl.dot(xt, at)
            pp = p_ptr + ((j * S + s_c[None, :]) * T + rows[:, None]) * BLOCK_R + r_c[None, :]
            tl.store(pp, acc * scale, mask=m_ok[:, None] & in_s[None, :])  # rank padding stores zeros
        else:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            for s in tl.static_range(S):
                a_s = a_ptr + lora_off + tl.load(a_off_ptr + s)
                acc = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
                acc = _shrink_acc(acc, x_ptr, a_s, rows, m_ok, offs_r, r_ok, k_lo, k_hi, K, stride_xm, R, BK)
                pp = p_ptr + ((j * S + s) * T + rows[:, None]) * BLOCK_R + offs_r[None, :]
                tl.store(pp, acc * scale, mask=m_ok[:, None])


@triton.jit
def _expand_kernel(y_ptr, x_ptr, a_ptr, a_off_ptr, b_ptr, b_off_ptr, p_ptr, tiles_ptr, CAP, T, K,
                   stride_xm, stride_ym, scale, split_rt,
                   N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
                   BLOCK_R: tl.constexpr, S: tl.constexpr, SPLIT_K: tl.constexpr, FUSED: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, N_ITERS: tl.constexpr,
                   ADD: tl.constexpr):
    """y[t, cols of one chunk of slice s] (+)= h_s[t] @ B_s[slot t][chunk]^T for the tokens of one tile
    (ADD=False: y is written, not read — vLLM's add_inputs=False for its dual-stream LoRA)."""
    valid, lora, m_ok, rows = _tile(tl.program_id(0), tiles_ptr, CAP, BM)
    if valid:
        s, n_s, col0, n_lo = _chunk(tl.program_id(1), N0, N1, N2, BN * N_ITERS)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        if FUSED:
            a_s = a_ptr + lora.to(tl.int64) * R * K + tl.load(a_off_ptr + s)
            h = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
            h = _shrink_acc(h, x_ptr, a_s, rows, m_ok, offs_r, r_ok, 0, K, K, stride_xm, R, BK) * scale
        else:
            h = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
            if SPLIT_K > 0:
                for j in tl.static_range(SPLIT_K):
                    pp = p_ptr + ((j * S + s) * T + rows[:, None]) * BLOCK_R + offs_r[None, :]
                    h += tl.load(pp, mask=m_ok[:, None], other=0.0)
            else:  # prefill: as many partials as this step's split (a runtime value)
                for j in range(split_rt):
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
            if ADD:
                yt = tl.load(yp, mask=ym, other=0.0)
                acc += yt.to(tl.float32)
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _gemm_rows(pid_m, tiles_ptr, CAP, GRID_M, T, BM: tl.constexpr):
    """Rows of program `pid_m` of a kernel that writes every row of its output -> (adapter slot, or -2 for rows
    without one; token index per row; row mask; live). The step's tiles first (GRID_M of them: adapters' and
    BASE_TILE ones), then the rows past the tokens the step maps (CUDA-graph padding), BM at a time;
    GRID_M = 0: every row from row 0 is a row without an adapter."""
    offs_m = tl.arange(0, BM)
    if pid_m < GRID_M:
        lora = tl.load(tiles_ptr + pid_m)
        n_rows = tl.load(tiles_ptr + CAP + pid_m)
        rows = tl.load(tiles_ptr + 2 * CAP + pid_m.to(tl.int64) * BM + offs_m).to(tl.int64)
        m_ok = offs_m < n_rows
        live = lora != -1
    else:  # padding rows (not in the step's mapping)
        mapped = pid_m * 0
        if GRID_M > 0:
            mapped = tl.load(tiles_ptr + CAP * (2 + BM))
        r0 = mapped + (pid_m - GRID_M) * BM
        rows = (r0 + offs_m).to(tl.int64)
        m_ok = rows < T
        lora = mapped * 0 - 2  # BASE_TILE, as an int32 value like the other branch's
        live = r0 < T
    return lora, rows, m_ok, live


# T (the step's rows) and GRID_M vary with every step: not specialized (Triton would compile a variant per
# divisibility class while serving — seen on the H200 as "JIT compilation during inference")
@triton.jit(do_not_specialize=["GRID_M", "T"])
def _gemm_expand_kernel(y_ptr, out_ptr, b_ptr, b_off_ptr, tiles_ptr, CAP, GRID_M, T, stride_om, stride_ym, scale,
                        N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
                        BLOCK_R: tl.constexpr, LR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        N_ITERS: tl.constexpr, USE_GDC: tl.constexpr):
    """y[t, chunk of slice s] = out[t, chunk] (+ (h_s[t] * scale) @ B_s[slot t][chunk]^T when t has an adapter),
    where out = x @ [W; A_0; A_1; A_2]^T came from the base GEMM and h_s[t] is its rank-R block of slot t:
    columns N + s*LR + slot*R (LR = max_loras * R). Every row of y is written: the adapters' tiles, then the
    tiles of tokens without one (BASE_TILE), then, past the tokens the step maps, CUDA-graph padding rows.
    USE_GDC (programmatic dependent launch, Hopper): the launch may begin while the GEMM finishes; the tile
    table (copied before the GEMM was queued) is read first, `out` only after the grid dependency wait."""
    lora, rows, m_ok, live = _gemm_rows(tl.program_id(0), tiles_ptr, CAP, GRID_M, T, BM)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # everything below reads the GEMM's output
    if live:
        s, n_s, col0, n_lo = _chunk(tl.program_id(1), N0, N1, N2, BN * N_ITERS)
        if lora >= 0:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            hcol = (N0 + N1 + N2) + s * LR + lora * R + offs_r
            h = tl.load(out_ptr + rows[:, None] * stride_om + hcol[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0)
            h = (h.to(tl.float32) * scale).to(y_ptr.dtype.element_ty)
            b_s = b_ptr + tl.load(b_off_ptr + s) + lora.to(tl.int64) * n_s * R
            for it in tl.static_range(N_ITERS):
                offs_n = n_lo + it * BN + tl.arange(0, BN)
                n_ok = offs_n < n_s
                om = m_ok[:, None] & n_ok[None, :]
                base = tl.load(out_ptr + rows[:, None] * stride_om + (col0 + offs_n)[None, :], mask=om, other=0.0)
                bt = tl.load(b_s + offs_n[None, :] * R + offs_r[:, None], mask=n_ok[None, :] & r_ok[:, None],
                             other=0.0)
                acc = tl.dot(h, bt) + base.to(tl.float32)
                tl.store(y_ptr + rows[:, None] * stride_ym + (col0 + offs_n)[None, :], acc.to(y_ptr.dtype.element_ty),
                         mask=om)
        else:
            for it in tl.static_range(N_ITERS):
                offs_n = n_lo + it * BN + tl.arange(0, BN)
                om = m_ok[:, None] & (offs_n < n_s)[None, :]
                base = tl.load(out_ptr + rows[:, None] * stride_om + (col0 + offs_n)[None, :], mask=om, other=0.0)
                tl.store(y_ptr + rows[:, None] * stride_ym + (col0 + offs_n)[None, :], base, mask=om)


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


TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096)  # tokens per step (per LoRA call); above the last: "tbig"
#: The step size each bucket's tuned configuration was measured at (`scripts/gpu_lora_kernels.py --sweep`
#: times these): the decode batch sizes at their top (CUDA graphs), the prefill buckets where their
#: common steps are — the running decode tokens plus one (1028), three (2956) whole ~964-token prompts, or
#: a full 8192-token chunk. A prefill-sized step keeps about the measured number of shrink programs
#: (`step_split`).
BUCKET_TOKENS = {"t16": 16, "t64": 64, "t256": 256, "t1024": 1024, "t2048": 1028, "t4096": 2956, "tbig": 8192}
SHRINK_PROGRAMS = 256  # default_config's target of tiles x splits for a prefill step (H200: 132 SMs)


def token_bucket(tokens: int) -> str:
    for b in TOKEN_BUCKETS:
        if tokens <= b:
            return f"t{b}"
    return "tbig"


def config_key(tokens: int, k: int, widths: Sequence[int], rank: int) -> str:
    return f"{token_bucket(tokens)}:k{k}:n{'+'.join(str(w) for w in widths)}:r{rank}"


def _max_split(k: int, bk: int) -> int:
    return max(1, k // max(bk, 256))


def default_config(tokens: int, k: int, widths: Sequence[int], rank: int) -> Config:
    """Launch configuration for shapes `TUNED` does not list: the pattern the H200 sweep found for the
    Llama-3-8B shapes (docs/bench/gpu-kernels/), generalised by K and the number of slices. Prefill
    steps split K until tiles x splits reaches SHRINK_PROGRAMS: a ~1000-token step has only ~16 tiles
    of 64 tokens, and one K loop of 14336 (down_proj) per tile was 8x its memory floor (lease 2)."""
    if tokens <= 256:  # decode: few tokens per adapter; parallelism must come from K and N
        split = 16 if (k >= 8192 or len(widths) > 1) else 8
        split = max(1, min(split, k // 256))
        return Config(fused=False, bm=16 if tokens <= 64 else 32, bn=128, bk=128, n_iters=1, split_k=split)
    split = min(_pow2(-(-SHRINK_PROGRAMS // -(-tokens // 64))), _max_split(k, 128))
    return Config(fused=False, bm=64, bn=128, bk=128, n_iters=1, split_k=split)


def step_split(cfg: Config, tokens: int, k: int) -> int:
    """The split-K of one call: `cfg.split_k` at the step size its bucket was tuned at; a prefill-sized
    step of another size keeps about as many shrink programs (tiles x splits), rounded to the nearest power
    of two (each distinct split is one more compiled kernel). Decode buckets (CUDA graphs) use it unchanged."""
    if cfg.fused or tokens <= 256:
        return cfg.split_k
    ref = BUCKET_TOKENS[token_bucket(tokens)]
    want = cfg.split_k * -(-ref // cfg.bm)
    have = -(-tokens // cfg.bm)
    if have == -(-ref // cfg.bm):
        return cfg.split_k
    return max(1, min(1 << max(0, round(math.log2(want / have))), _max_split(k, cfg.bk)))


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
    if hit is None or hit.bm not in TILE_BMS:  # the host builds tile tables for TILE_BMS only
        return default_config(tokens, k, widths, rank)
    return hit


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
                tiles: Sequence[torch.Tensor], nl: int, scale: float = 1.0, config: Config | None = None,
                add_inputs: bool = True) -> None:
    """In place: y[t, slice cols] += x[t] @ A_s[slot]^T @ B_s[slot]^T * scale for tokens with a slot
    (``add_inputs=False``: ``=`` instead of ``+=``; rows of tokens without an adapter are never touched).

    `tiles`: this step's tile tables, one int32 tensor per height in `step_meta.TILE_BMS` (built on the
    host by `step_meta.fill_tiles`; `make_tiles` for tests), `nl`: slot groups (max_loras + 1).
    x: [T, K]; y: [T, ΣN_s], row stride free, unit column stride.
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
    table = tiles[TILE_BMS.index(cfg.bm)]
    cap = table.numel() // (2 + cfg.bm)
    grid_m = min(cap, -(-T // cfg.bm) + nl)  # >= the tiles of any T-token step (spare programs exit)
    BLOCK_R = max(16, _pow2(R))
    a_off, b_off = _offsets(lora_a), _offsets(lora_b)
    n = widths + [0] * (MAX_SLICES - S)
    ch = cfg.bn * cfg.n_iters
    chunks = sum(-(-w // ch) for w in widths)
    if cfg.fused:
        _expand_kernel[(grid_m, chunks)](
            y, x, lora_a[0], a_off, lora_b[0], b_off, x, table, cap, T, K, x.stride(0), y.stride(0), scale, 1,
            N0=n[0], N1=n[1], N2=n[2], R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=1, FUSED=True, BM=cfg.bm, BN=cfg.bn,
            BK=cfg.bk, N_ITERS=cfg.n_iters, ADD=add_inputs, num_warps=cfg.warps, num_stages=cfg.stages)
        return
    kc = -(-(-(-K // step_split(cfg, T, K))) // cfg.bk) * cfg.bk
    split = -(-K // kc)
    # Decode sizes (CUDA graphs, a handful of sizes) compile the split into the kernels; prefill steps,
    # whose split follows the step size (`step_split`), take it as a runtime value, so a new step size
    # never compiles a kernel while serving.
    dyn = T > 256
    p = torch.empty((split, S, T, BLOCK_R), dtype=torch.float32, device=x.device)
    block_sr = _pow2(S * BLOCK_R)
    combine = S > 1 and cfg.bm * block_sr <= COMBINE_MAX
    _shrink_kernel[(grid_m, split)](
        x, lora_a[0], a_off, p, table, cap, T, K, x.stride(0), scale, kc,
        R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=0 if dyn else split, KC=0 if dyn else kc, BM=cfg.bm, BK=cfg.bk,
        COMBINE=combine, BLOCK_SR=block_sr, num_warps=cfg.warps, num_stages=cfg.stages)
    _expand_kernel[(grid_m, chunks)](
        y, x, lora_a[0], a_off, lora_b[0], b_off, p, table, cap, T, K, x.stride(0), y.stride(0), scale, split,
        N0=n[0], N1=n[1], N2=n[2], R=R, BLOCK_R=BLOCK_R, S=S, SPLIT_K=0 if dyn else split, FUSED=False, BM=cfg.bm,
        BN=cfg.bn, BK=cfg.bk, N_ITERS=cfg.n_iters, ADD=add_inputs, num_warps=cfg.warps, num_stages=cfg.stages)


GEMM_MAX_SHARE = 0.25  # fuse the shrink into the base GEMM while the LoRA rows are at most this share of N
PDL_ENV = "PEFTDEPLOY_LORA_PDL"
_PDL: dict[int, bool] = {}


def use_pdl(device: torch.device) -> bool:
    """Launch the GEMM-fused expand with programmatic dependent launch (PEFTDEPLOY_LORA_PDL=1; compute
    capability 9.0+, not under the Triton interpreter), so its launch overlaps the base GEMM's tail."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(PDL_ENV, "0") != "1":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL[idx]


def gemm_config(tokens: int, k: int = 0, widths: Sequence[int] = (), rank: int = 16) -> Config:
    """Launch configuration of the GEMM-fused expand (`lora_gemm`): a tuned or overridden entry under
    ``"gemm:" + config_key`` (PEFTDEPLOY_LORA_KERNEL_CONFIG, `TUNED`), else by the step's token count."""
    global _OVERRIDES
    if _OVERRIDES is None:
        _OVERRIDES = _overrides()
    key = "gemm:" + config_key(tokens, k, widths, rank)
    hit = _OVERRIDES.get(key) or TUNED.get(key)
    if hit is not None and hit.bm in TILE_BMS:
        return hit
    # H200 sweep (8B shapes, 64 and 1028 tokens): 64 columns a program for layers up to 8192 wide, 2 x 128
    # for gate_up; every default within 0.9 µs of the best. One configuration for every prefill size, so
    # vLLM's profile run (max_num_batched_tokens) compiles it before serving.
    bn, it = (64, 1) if sum(widths) <= 8192 else (128, 2)
    return Config(fused=True, bm=16 if tokens <= 64 else (32 if tokens <= 256 else 64), bn=bn, bk=16, n_iters=it)


def lora_gemm(x: torch.Tensor, ext: torch.Tensor, bias: torch.Tensor | None, n: int, lora_b: Sequence[torch.Tensor],
              tiles: Sequence[torch.Tensor], nl: int, max_loras: int, rank: int, scale: float = 1.0,
              config: Config | None = None, pdl: bool | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) + per-token LoRA, with the LoRA shrink done by the base GEMM itself.

    `ext` is ``[W; A_0; ...; A_{S-1}]``: the layer's weight W (n rows) followed by each slice's A stack
    (``max_loras * rank`` rows each; vLLM's ``lora_a_stacked`` are views of those rows, see gemm_fused.py),
    so one cuBLAS GEMM yields the base output and every adapter's rank-R intermediate for every token;
    one Triton launch then adds each token's own ``h @ B^T`` and writes y (contiguous, every row). The
    intermediate is rounded to the weights' dtype by the GEMM, then scaled, like vLLM's shrink output."""
    out = torch.nn.functional.linear(x, ext, bias)
    T = x.shape[0]
    y = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    S = len(lora_b)
    widths = [int(t.shape[-2]) for t in lora_b]
    assert sum(widths) == n and ext.shape[0] == n + S * max_loras * rank, (ext.shape, widths, max_loras, rank)
    cfg = config or gemm_config(T, x.shape[1], widths, rank)
    table = tiles[TILE_BMS.index(cfg.bm)]
    cap = table.numel() // (2 + cfg.bm)
    grid_m = min(cap, -(-T // cfg.bm) + nl)
    nw = widths + [0] * (MAX_SLICES - S)
    ch = cfg.bn * cfg.n_iters
    chunks = sum(-(-w // ch) for w in widths)
    gdc = use_pdl(x.device) if pdl is None else pdl
    _gemm_expand_kernel[(grid_m + -(-T // cfg.bm), chunks)](
        y, out, lora_b[0], _offsets(lora_b), table, cap, grid_m, T, out.stride(0), y.stride(0), scale,
        N0=nw[0], N1=nw[1], N2=nw[2], R=rank, BLOCK_R=max(16, _pow2(rank)), LR=max_loras * rank, BM=cfg.bm,
        BN=cfg.bn, N_ITERS=cfg.n_iters, USE_GDC=gdc, num_warps=cfg.warps, num_stages=cfg.stages,
        **({"launch_pdl": True} if gdc else {}))
    return y


def make_tiles(slots: torch.Tensor, max_loras: int, max_tokens: int | None = None) -> tuple[list[torch.Tensor], int]:
    """(tile tables, nl) for a token->slot mapping, as the wrapper builds them per step (tests, benchmarks)."""
    import numpy as np

    s = slots.detach().to("cpu", torch.int32).numpy()
    lay = step_meta.Layout.make(max_tokens or max(1, s.size), max_loras, metas=())
    buf = np.zeros(lay.size, dtype=np.int32)
    step_meta.fill_tiles(buf, lay, step_meta.group(s))
    dev = torch.from_numpy(buf).to(slots.device)
    return [dev[o:o + step_meta.table_size(cap, bm)] for bm, (o, cap) in lay.tiles.items()], lay.nl


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
