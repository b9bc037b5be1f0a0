"""gate_up's LoRA expand folded into the MLP's activation (CUDA, peftdeploy's punica wrapper; opt-in).

With the shrink inside the base GEMM (gemm_fused.py) a gate_up layer still costs one more launch that reads
the GEMM's whole output ``[T, 2I + 2·max_loras·R]`` and writes the layer's ``[T, 2I]`` — which the MLP's
``SiluAndMul`` reads straight back. Measured on an H100 (8B shape, 8 slots of rank 16, 2026-12-07): the
gate_up LoRA costs 12.7 µs a layer at 64 tokens (the GEMM's A rows 3.9, the expand 8.8) and 72 µs at 1028
tokens, the largest of the four linear layers. Here, in an MLP of the known shape (``gate_up_proj`` →
``act_fn`` = SiluAndMul → ``down_proj``: `MLP_CLASSES`), the gate_up layer returns the GEMM's wide output
and ``act_fn`` becomes one launch that adds each token's ``h·Bᵀ`` to its gate and up columns, rounds them to
the layer's dtype as the unfused layer would, and applies ``silu(gate) · up``: the expand's pass over
``[T, 2I]`` is gone. Steps without adapter tokens run the same kernel as a plain SiluAndMul on the wide output.

``PEFTDEPLOY_LORA_ACT_FUSE=1`` turns it on (GEMM fusion must be on). An MLP that does not match (another
class, another activation, tensor parallelism, a gate_up layer that kept the split kernels) keeps
gemm_fused's path; a call the wide path cannot take (a 3-D input) gets the layer's usual output and
vLLM's activation.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import triton
import triton.language as tl

from .step_meta import TILE_BMS
from .triton_ops import _gemm_rows, _offsets, _pow2, gemm_config

logger = logging.getLogger("vllm.peftdeploy")
ENV = "PEFTDEPLOY_LORA_ACT_FUSE"
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP")  # forward: x, _ = gate_up_proj(x); x = act_fn(x); x, _ = down_proj(x)


def enabled() -> bool:
    return os.environ.get(ENV, "0").strip() == "1"


@triton.jit(do_not_specialize=["GRID_M", "T"])
def _gemm_silu_kernel(o_ptr, w_ptr, b_ptr, b_off_ptr, tiles_ptr, CAP, GRID_M, T, stride_wm, stride_om, scale,
                      I: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, LR: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, N_ITERS: tl.constexpr):
    """o[t, chunk] = silu(g) * u, g = round(w[t, chunk] (+ h_g[t] @ B_g[slot t][chunk]^T)) and u likewise from
    columns I + chunk, where w = x @ [W_gate; W_up; A_gate; A_up]^T came from the base GEMM and h_s[t] is its
    rank-R block of slot t (columns 2I + s*LR + slot*R). Every row of o is written (see _gemm_rows)."""
    lora, rows, m_ok, live = _gemm_rows(tl.program_id(0), tiles_ptr, CAP, GRID_M, T, BM)
    if live:
        n_lo = tl.program_id(1) * (BN * N_ITERS)
        dt = o_ptr.dtype.element_ty
        if lora >= 0:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            hm = m_ok[:, None] & r_ok[None, :]
            hcol = 2 * I + lora * R + offs_r
            hg = tl.load(w_ptr + rows[:, None] * stride_wm + hcol[None, :], mask=hm, other=0.0)
            hu = tl.load(w_ptr + rows[:, None] * stride_wm + (hcol + LR)[None, :], mask=hm, other=0.0)
            hg = (hg.to(tl.float32) * scale).to(dt)
            hu = (hu.to(tl.float32) * scale).to(dt)
            bg = b_ptr + tl.load(b_off_ptr) + lora.to(tl.int64) * I * R
            bu = b_ptr + tl.load(b_off_ptr + 1) + lora.to(tl.int64) * I * R
            for it in tl.static_range(N_ITERS):
                offs_n = n_lo + it * BN + tl.arange(0, BN)
                n_ok = offs_n < I
                om = m_ok[:, None] & n_ok[None, :]
                bm = n_ok[None, :] & r_ok[:, None]
                g = tl.load(w_ptr + rows[:, None] * stride_wm + offs_n[None, :], mask=om, other=0.0)
                u = tl.load(w_ptr + rows[:, None] * stride_wm + (I + offs_n)[None, :], mask=om, other=0.0)
                btg = tl.load(bg + offs_n[None, :] * R + offs_r[:, None], mask=bm, other=0.0)
                btu = tl.load(bu + offs_n[None, :] * R + offs_r[:, None], mask=bm, other=0.0)
                gf = (tl.dot(hg, btg) + g.to(tl.float32)).to(dt).to(tl.float32)
                uf = (tl.dot(hu, btu) + u.to(tl.float32)).to(dt).to(tl.float32)
                tl.store(o_ptr + rows[:, None] * stride_om + offs_n[None, :],
                         (gf * tl.sigmoid(gf) * uf).to(dt), mask=om)
        else:
            for it in tl.static_range(N_ITERS):
                offs_n = n_lo + it * BN + tl.arange(0, BN)
                om = m_ok[:, None] & (offs_n < I)[None, :]
                gf = tl.load(w_ptr + rows[:, None] * stride_wm + offs_n[None, :], mask=om, other=0.0).to(tl.float32)
                uf = tl.load(w_ptr + rows[:, None] * stride_wm + (I + offs_n)[None, :], mask=om,
                             other=0.0).to(tl.float32)
                tl.store(o_ptr + rows[:, None] * stride_om + offs_n[None, :], (gf * tl.sigmoid(gf) * uf).to(dt),
                         mask=om)


def lora_silu_mul(wide: torch.Tensor, lora_b: list[torch.Tensor], tiles: list[torch.Tensor], nl: int, inter: int,
                  max_loras: int, rank: int, scale: float = 1.0, *, no_lora: bool = False) -> torch.Tensor:
    """silu(gate) · up of a gate_up layer whose LoRA expand has not run: `wide` is its base GEMM's output
    ``x @ [W; A_gate; A_up]^T`` (gemm_fused.py), `lora_b` its two B stacks ``[max_loras, 1, inter, R]``.
    no_lora: no token of the step uses an adapter (the tile tables are not read)."""
    T = wide.shape[0]
    out = torch.empty((T, inter), dtype=wide.dtype, device=wide.device)
    if T == 0:
        return out
    assert len(lora_b) == 2 and all(int(b.shape[-2]) == inter for b in lora_b), [b.shape for b in lora_b]
    need = 2 * inter + (0 if no_lora else 2 * max_loras * rank)  # no_lora: the h columns are not read
    assert wide.shape[1] >= need and wide.stride(1) == 1, (wide.shape, inter, max_loras, rank)
    cfg = gemm_config(T, 0, (inter, inter), rank)
    table = tiles[TILE_BMS.index(cfg.bm)]
    cap = table.numel() // (2 + cfg.bm)
    grid_m = 0 if no_lora else min(cap, -(-T // cfg.bm) + nl)
    ch = cfg.bn * cfg.n_iters
    _gemm_silu_kernel[(grid_m + -(-T // cfg.bm), -(-inter // ch))](
        out, wide, lora_b[0], _offsets(lora_b), table, cap, grid_m, T, wide.stride(0), out.stride(0), scale,
        I=inter, R=rank, BLOCK_R=max(16, _pow2(rank)), LR=max_loras * rank, BM=cfg.bm, BN=cfg.bn,
        N_ITERS=cfg.n_iters, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def reference(x: torch.Tensor, w: torch.Tensor, a: list[torch.Tensor], b: list[torch.Tensor], slots: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
    """silu(gate) · up in float64 for tokens with adapter slots `slots` (-1: none); a/b: the two slices' stacks."""
    inter = w.shape[0] // 2
    y = x.double() @ w.double().T
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            y[t] += torch.cat([(x[t].double() @ ai[s, 0].double().T) * scale @ bi[s, 0].double().T
                               for ai, bi in zip(a, b)])
    return torch.nn.functional.silu(y[:, :inter]) * y[:, inter:]


class LoRASiluAndMul(torch.nn.Module):
    """An MLP's act_fn over its converted gate_up layer's wide output (see the module docstring)."""

    def __init__(self, gate_up: Any, act: torch.nn.Module):
        super().__init__()
        self.act = act  # vLLM's SiluAndMul, for a call that got the layer's usual output
        self._gate_up = (gate_up,)  # a tuple: not a second registration of the layer as a submodule
        self.inter = int(gate_up.lora_b_stacked[0].shape[-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 2 * self.inter:
            return self.act(x)
        layer = self._gate_up[0]
        _, max_loras, rank = layer._pd_gemm
        return layer.punica_wrapper.add_lora_silu_mul(x, layer.lora_b_stacked, self.inter, max_loras, rank)


def why_not(mlp: Any) -> str | None:
    """Why `mlp`'s gate_up keeps its own expand launch (None: it can run inside the activation)."""
    name = type(mlp).__name__
    if name not in MLP_CLASSES:
        return f"{name} is not one of {', '.join(MLP_CLASSES)}"
    gate_up, act = getattr(mlp, "gate_up_proj", None), getattr(mlp, "act_fn", None)
    if type(act).__name__ != "SiluAndMul":
        return f"activation {type(act).__name__}"
    if getattr(gate_up, "_pd_ext", None) is None:
        return "its gate_up layer keeps the split kernels"
    if getattr(gate_up, "tp_size", 1) != 1:
        return "tensor parallelism"
    if len(gate_up.lora_b_stacked) != 2 or len({int(b.shape[-2]) for b in gate_up.lora_b_stacked}) != 1:
        return "gate_up slices of different widths"
    return None


def attach(model: torch.nn.Module) -> int:
    """Give every matching MLP of `model` the fused activation; returns how many."""
    n, said = 0, set()
    for _, mlp in model.named_modules():
        if not hasattr(mlp, "gate_up_proj") or not hasattr(mlp, "act_fn") or isinstance(mlp.act_fn, LoRASiluAndMul):
            continue
        why = why_not(mlp)
        if why is None:
            mlp.gate_up_proj._pd_wide = True
            mlp.act_fn = LoRASiluAndMul(mlp.gate_up_proj, mlp.act_fn)
            n += 1
        elif why not in said:
            said.add(why)
            logger.info("peftdeploy: LoRA kernels: gate_up keeps its expand launch: %s", why)
    if n:
        logger.info("peftdeploy: LoRA kernels: gate_up's LoRA expand runs inside the activation in %d MLPs "
                    "(%s=1)", n, ENV)
    return n


def install() -> bool:
    """Attach the fused activation (and norm_fused's norms) when vLLM has made a model's LoRA layers
    (LoRAModelManager), each when its switch is on. Idempotent."""
    from vllm.lora.model_manager import LoRAModelManager

    if getattr(LoRAModelManager, "_pd_act_fused", False):
        return True
    orig = getattr(LoRAModelManager, "_create_lora_modules", None)
    if orig is None:
        logger.info("peftdeploy: LoRA kernels: this vLLM has no LoRAModelManager._create_lora_modules: "
                    "gate_up keeps its expand launch")
        return False

    def _create_lora_modules(self: Any) -> None:
        orig(self)
        from . import norm_fused

        if enabled():
            attach(self.model)
        if norm_fused.enabled():
            norm_fused.attach(self.model)

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager._pd_act_fused = True
    return True
