"""peftdeploy's punica wrapper for CUDA: vLLM's `PunicaWrapperGPU` with every LoRA *linear* layer run
by peftdeploy's Triton kernels (`triton_ops.lora_linear`: one launch or two per layer for all slices
and all adapters of the batch, tokens without an adapter skipped, no fp32 scratch to zero).

vLLM's per-step metadata (`LoRAKernelMeta`: tokens grouped by adapter slot) is reused as is, so the
wrapper changes no scheduling and no memory layout: the LoRA weight stacks stay vLLM's. Logits and
embedding LoRA (rare) keep vLLM's kernels. A layer the kernels cannot take (dtype, rank, slices,
layout; `triton_ops.unsupported`) falls back to vLLM's kernels for that layer and says so once in
the log: never a silently wrong answer.

The kernels run inside a custom op (``torch.ops.peftdeploy.lora_linear``) so that torch.compile does
not trace into them and CUDA graphs capture them as plain launches; the op returns at once when no
token of the step uses an adapter (vLLM's ``no_lora_flag_cpu``, read outside the graph).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("vllm.peftdeploy")
_warned: set[str] = set()
_LIB: Any = None


def available() -> tuple[bool, str]:
    """(ok, why): can this process run the peftdeploy CUDA kernels?"""
    try:
        import triton  # noqa: F401

        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"cannot import Triton / vLLM's GPU punica wrapper ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"compute capability {major}.x (the kernels need 8.0+ for bfloat16)"
    return True, "triton " + __import__("triton").__version__


def _impl(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
          sorted_tokens: torch.Tensor, tokens_per_slot: torch.Tensor, slot_start: torch.Tensor,
          slot_ids: torch.Tensor, no_lora: torch.Tensor, scale: float) -> None:
    if bool(no_lora.item()):
        return
    from .triton_ops import lora_linear

    lora_linear(y, x, lora_a, lora_b, sorted_tokens, tokens_per_slot, slot_start, slot_ids, scale)


def _fake(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
          sorted_tokens: torch.Tensor, tokens_per_slot: torch.Tensor, slot_start: torch.Tensor,
          slot_ids: torch.Tensor, no_lora: torch.Tensor, scale: float) -> None:
    return None


def register_op() -> Any:
    """Define ``torch.ops.peftdeploy.lora_linear`` once per process (CUDA and, for tests, CPU)."""
    global _LIB
    if _LIB is None:
        from torch.library import Library, infer_schema

        lib = Library("peftdeploy", "FRAGMENT")
        lib.define("lora_linear" + infer_schema(_impl, mutates_args=["y"]))
        lib.impl("lora_linear", _impl, "CUDA")
        lib.impl("lora_linear", _impl, "CPU")
        torch.library.register_fake("peftdeploy::lora_linear", _fake, lib=lib)
        _LIB = lib
    return torch.ops.peftdeploy.lora_linear


def _fallback(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        logger.warning("peftdeploy: LoRA kernels: a layer falls back to vLLM's kernels: %s", why)


def _make_class() -> type:
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from .triton_ops import unsupported

    class PunicaWrapperPeftdeployGPU(PunicaWrapperGPU):  # type: ignore[misc,valid-type]
        """vLLM's GPU punica wrapper with peftdeploy's fused Triton kernels for linear layers."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._pd_op = register_op()

        def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                            lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                            output_slices: tuple[int, ...], *, buffer: torch.Tensor | None = None,
                            **kwargs: Any) -> None:
            why = unsupported(x, lora_a_stacked, lora_b_stacked)
            if why is None and not kwargs.get("add_inputs", True):
                why = "add_inputs=False (dual-stream LoRA)"
            if why is None and tuple(output_slices) != tuple(int(b.shape[-2]) for b in lora_b_stacked):
                why = f"output slices {tuple(output_slices)} differ from the B stacks"
            if why is not None:
                _fallback(why)
                return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                               buffer=buffer, **kwargs)
            x2 = x.view(-1, x.shape[-1])
            y2 = y.view(-1, y.shape[-1])
            meta = self.token_mapping_meta
            t = x2.size(0)
            self._pd_op(y2, x2, list(lora_a_stacked), list(lora_b_stacked),
                        meta.token_indices_sorted_by_lora_ids[:t], meta.num_tokens_per_lora,
                        meta.lora_token_start_loc, meta.active_lora_ids, meta.no_lora_flag_cpu, float(scale))
            return None

    PunicaWrapperPeftdeployGPU.__module__ = __name__
    PunicaWrapperPeftdeployGPU.__qualname__ = "PunicaWrapperPeftdeployGPU"
    return PunicaWrapperPeftdeployGPU


def __getattr__(name: str) -> Any:
    # Built on first use: importing this module must not import vLLM (the planner and tests import it).
    if name == "PunicaWrapperPeftdeployGPU":
        cls = _make_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
