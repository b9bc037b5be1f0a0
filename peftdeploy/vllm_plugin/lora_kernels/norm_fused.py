"""o_proj's and down_proj's LoRA expand folded into the residual add + RMSNorm that follows them (CUDA,
peftdeploy's punica wrapper; opt-in).

With the shrink inside the base GEMM (gemm_fused.py) a row-parallel layer (o_proj, down_proj) still costs one
more launch that reads the GEMM's output ``[T, H + max_loras·R]`` and writes the layer's ``[T, H]`` — which
the decoder's next RMSNorm reads straight back to add the residual and normalise. Measured on an H100 (8B
shape, 8 slots of rank 16, 2026-12-07): o's LoRA costs 3.7 µs a layer at 64 tokens (its GEMM's A rows 0.4),
down's 4.7 (1.3) — most of it the expand launch itself. In a decoder of the known shape (`DECODER_CLASSES`:
``input_layernorm`` → attention → ``o_proj`` → ``post_attention_layernorm`` → MLP → ``down_proj`` → the next
layer's ``input_layernorm`` or the model's final ``norm``), the layer returns its GEMM's wide output and the
norm after it becomes one launch per token that adds the token's ``h·Bᵀ`` (rounded to the dtype as the
unfused layer rounds it), adds the residual, writes the new residual and the normalised row — vLLM's
``fused_add_rms_norm`` with the LoRA expand inside. Rounding as vLLM's CUDA kernel: the residual is stored in
the dtype and normalised from there; the output is ``round(round(x·rstd)·w)``.

``PEFTDEPLOY_LORA_NORM_FUSE=1`` turns it on (GEMM fusion must be on). A layer whose consumer is not such a
norm (another decoder class, pipeline parallelism, EAGLE's auxiliary hidden states, a layer that kept the
split kernels) keeps gemm_fused's path; a call with a hidden-size input (the first layer's norm, a call the
wide path did not take) runs vLLM's norm.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_ops import _pow2

logger = logging.getLogger("vllm.peftdeploy")
ENV = "PEFTDEPLOY_LORA_NORM_FUSE"
DECODER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")  # forward: see the module docstring
NORM_CLASSES = ("RMSNorm",)


def enabled() -> bool:
    return os.environ.get(ENV, "0").strip() == "1"


@triton.jit(do_not_specialize=["T"])
def _add_rms_norm_kernel(o_ptr, ro_ptr, w_ptr, r_ptr, nw_ptr, b_ptr, map_ptr, cnt_ptr, T, stride_wm, stride_rm,
                         eps, scale, H: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr,
                         BN: tl.constexpr, LORA: tl.constexpr):
    """Rows t of this program's G: y = round(w[t, :H] (+ round(h_t·scale) @ B[slot t]^T)), x = y + r[t];
    ro[t] = round(x); o[t] = round(round(ro[t] · rsqrt(mean(x²) + eps)) · nw). h_t = w[t, H + slot·R :
    H + (slot+1)·R] (the layer's GEMM output past its H columns); slot from the step's token mapping, -1
    (none) for rows past the tokens the step maps (CUDA-graph padding). Rows of one program that share an
    adapter (a prompt's tokens) load the same B lines: one L2 read per program, not one per row."""
    rows = tl.program_id(0) * G + tl.arange(0, G)
    row_ok = rows < T
    dt = o_ptr.dtype.element_ty
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if LORA:
        mapped = tl.load(cnt_ptr)
        slot = tl.load(map_ptr + rows, mask=row_ok & (rows < mapped), other=-1)
    else:
        slot = tl.full([G], -1, tl.int32)
    live = slot >= 0
    h = tl.load(w_ptr + rows64[:, None] * stride_wm + H + slot[:, None] * R + offs_r[None, :],
                mask=live[:, None] & r_ok[None, :], other=0.0)
    h = (h.to(tl.float32) * scale).to(dt).to(tl.float32)
    b_rows = b_ptr + tl.maximum(slot, 0).to(tl.int64) * H * R
    acc = tl.zeros([G, BN], dtype=tl.float32)
    for n0 in tl.static_range(0, H, BN):
        offs = n0 + tl.arange(0, BN)
        m2 = row_ok[:, None] & (offs < H)[None, :]
        y = tl.load(w_ptr + rows64[:, None] * stride_wm + offs[None, :], mask=m2, other=0.0)
        if LORA:
            bm = (live[:, None, None] & (offs < H)[None, :, None]) & r_ok[None, None, :]
            bt = tl.load(b_rows[:, None, None] + offs[None, :, None] * R + offs_r[None, None, :], mask=bm, other=0.0)
            y = (tl.sum(bt.to(tl.float32) * h[:, None, :], axis=2) + y.to(tl.float32)).to(dt)
        x = y.to(tl.float32) + tl.load(r_ptr + rows64[:, None] * stride_rm + offs[None, :], mask=m2,
                                       other=0.0).to(tl.float32)
        tl.store(ro_ptr + rows64[:, None] * H + offs[None, :], x.to(dt), mask=m2)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / H + eps)
    tl.debug_barrier()  # the rows' residuals, written above by this program's threads, are read back below
    for n0 in tl.static_range(0, H, BN):
        offs = n0 + tl.arange(0, BN)
        m2 = row_ok[:, None] & (offs < H)[None, :]
        x = tl.load(ro_ptr + rows64[:, None] * H + offs[None, :], mask=m2, other=0.0).to(tl.float32)
        xn = (x * rstd[:, None]).to(dt).to(tl.float32)
        nw = tl.load(nw_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)
        tl.store(o_ptr + rows64[:, None] * H + offs[None, :], (xn * nw[None, :]).to(dt), mask=m2)


ROWS_PER_PROGRAM_MAX = 16
SMS = 132  # programs of one wave on an H100 / H200: fewer rows per program below it


def rows_per_program(tokens: int) -> int:
    """Rows a program normalises: 1 for a decode batch (one program per token fills the GPU), more for a
    prefill step (rows of one prompt share their adapter's B lines), at most ROWS_PER_PROGRAM_MAX."""
    return max(1, min(ROWS_PER_PROGRAM_MAX, _pow2(max(1, tokens // SMS))))


def lora_add_rms_norm(wide: torch.Tensor, residual: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor,
                      eps: float, mapping: torch.Tensor, mapped: torch.Tensor, rank: int, scale: float = 1.0, *,
                      no_lora: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised, new residual) of a row-parallel LoRA layer whose expand has not run, then vLLM's
    fused_add_rms_norm: `wide` is the layer's GEMM output ``x @ [W; A]^T`` (gemm_fused.py), `lora_b` its B
    stack ``[max_loras, 1, H, R]``, `mapping` the step's slot per token (-1: none) and `mapped` a 1-element
    tensor with how many tokens the step maps. no_lora: no token of the step uses an adapter."""
    T, H = residual.shape[0], int(lora_b.shape[-2])
    out = torch.empty((T, H), dtype=wide.dtype, device=wide.device)
    res = torch.empty((T, H), dtype=wide.dtype, device=wide.device)
    if T == 0:
        return out, res
    assert residual.shape == (T, H) and residual.stride(1) == 1 and weight.shape == (H,), (residual.shape, H)
    assert wide.shape[0] == T and wide.shape[1] >= H + (0 if no_lora else int(lora_b.shape[0]) * rank), \
        (wide.shape, H, lora_b.shape, rank)
    assert wide.stride(1) == 1 and lora_b.is_contiguous() and int(lora_b.shape[-1]) == rank, lora_b.shape
    g = rows_per_program(T)
    block_r = max(16, _pow2(rank))
    bn = max(16, min(_pow2(H), 8192 // (g * block_r)))
    _add_rms_norm_kernel[(-(-T // g),)](out, res, wide, residual, weight, lora_b, mapping, mapped, T,
                                        wide.stride(0), residual.stride(0), float(eps), float(scale), H=H, R=rank,
                                        BLOCK_R=block_r, G=g, BN=bn, LORA=not no_lora, num_warps=4)
    return out, res


def reference(y_wide: torch.Tensor, residual: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
              slots: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised, residual) in float64 for a wide GEMM output (`b`: [max_loras, 1, H, R]; slots -1: none)."""
    H, R = int(b.shape[-2]), int(b.shape[-1])
    x = y_wide[:, :H].double().clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            x[t] += (y_wide[t, H + s * R:H + (s + 1) * R].double() * scale) @ b[s, 0].double().T
    x = x + residual.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), x


class LoRAAddRMSNorm(torch.nn.Module):
    """A decoder's RMSNorm after a converted row-parallel layer that returns its wide output (see the module
    docstring); a hidden-size input goes to vLLM's norm."""

    def __init__(self, norm: torch.nn.Module, producer: Any):
        super().__init__()
        self.norm = norm
        self._producer = (producer,)  # a tuple: not a second registration of the layer as a submodule
        self.hidden = int(norm.weight.shape[0])

    @property
    def weight(self) -> torch.Tensor:  # as vLLM's norm (weight loading and quantization fusions look here)
        return self.norm.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if x.shape[-1] == self.hidden:
            return self.norm(x, residual) if residual is not None else self.norm(x)
        if residual is None:
            raise RuntimeError("peftdeploy: LoRA kernels: a wide LoRA output reached an RMSNorm without a residual")
        layer = self._producer[0]
        _, _, rank = layer._pd_gemm
        return layer.punica_wrapper.add_lora_rms_norm(x, residual, layer.lora_b_stacked[0], self.norm.weight,
                                                      self.norm.variance_epsilon, rank)


def why_not_norm(norm: Any) -> str | None:
    name = type(norm).__name__
    if name not in NORM_CLASSES:
        return f"the norm after it is {name}"
    if not getattr(norm, "has_weight", True) or getattr(norm, "variance_size_override", None) is not None:
        return "an RMSNorm without a weight or with a variance size of its own"
    return None


def why_not_layer(layer: Any) -> str | None:
    if getattr(layer, "_pd_ext", None) is None:
        return "it keeps the split kernels"
    if getattr(layer, "tp_size", 1) != 1:
        return "tensor parallelism"
    if len(layer.lora_b_stacked) != 1:
        return "more than one output slice"
    return None


def pairs(model: torch.nn.Module) -> tuple[list[tuple[Any, Any, str]], list[str]]:
    """(producer layer, its consumer norm's owner, the norm's attribute) for every o_proj / down_proj of the
    decoders of `model` whose output goes straight into a norm, and why others do not."""
    out: list[tuple[Any, Any, str]] = []
    why: list[str] = []
    for _, m in model.named_modules():
        layers = getattr(m, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers) or not hasattr(m, "norm"):
            continue
        if any(type(d).__name__ not in DECODER_CLASSES for d in layers):
            why.append(f"decoder class {type(layers[0]).__name__}")
            continue
        if (getattr(m, "start_layer", 0), getattr(m, "end_layer", len(layers))) != (0, len(layers)):
            why.append("pipeline parallelism")
            continue
        if getattr(m, "aux_hidden_state_layers", ()):
            why.append("auxiliary hidden states (EAGLE)")
            continue
        for i, d in enumerate(layers):
            nxt = (layers[i + 1], "input_layernorm") if i + 1 < len(layers) else (m, "norm")
            for prod, (owner, attr) in ((d.self_attn.o_proj, (d, "post_attention_layernorm")),
                                        (d.mlp.down_proj, nxt)):
                w = why_not_layer(prod) or why_not_norm(getattr(owner, attr))
                if w is None:
                    out.append((prod, owner, attr))
                else:
                    why.append(w)
    return out, why


def attach(model: torch.nn.Module) -> int:
    """Give every matching norm of `model` the fused launch; returns how many."""
    found, why = pairs(model)
    for w in dict.fromkeys(why):
        logger.info("peftdeploy: LoRA kernels: a row-parallel layer keeps its expand launch: %s", w)
    for prod, owner, attr in found:
        prod._pd_wide = True
        setattr(owner, attr, LoRAAddRMSNorm(getattr(owner, attr), prod))
    if found:
        logger.info("peftdeploy: LoRA kernels: the LoRA expand of %d o_proj / down_proj layers runs inside the "
                    "residual add + RMSNorm after them (%s=1)", len(found), ENV)
    return len(found)
