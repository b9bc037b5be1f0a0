"""peftdeploy's punica wrapper for CUDA: vLLM's `PunicaWrapperGPU` with every LoRA *linear* layer run
by peftdeploy's Triton kernels (`triton_ops.lora_linear`: one launch or two per layer for all slices
and all adapters of the batch, tokens without an adapter skipped, no fp32 scratch to zero).

The per-step metadata is built on the host from vLLM's `LoRAMapping` (`step_meta.py`): vLLM's own
`update_metadata` reads its device mapping back twice per step, which stalls asynchronous
scheduling; here the same `LoRAKernelMeta` fields (and peftdeploy's tile tables) go to the device in
one asynchronous copy. No scheduling and no memory layout change: the LoRA weight stacks stay vLLM's.
Logits and embedding LoRA (rare) keep vLLM's kernels (reading the same, host-built, metadata). A layer the kernels cannot take (dtype, rank, slices,
layout; `triton_ops.unsupported`) falls back to vLLM's kernels for that layer and says so once in
the log: never a silently wrong answer.

The kernels run inside a custom op (``torch.ops.peftdeploy.lora_linear``) so that torch.compile does
not trace into them and CUDA graphs capture them as plain launches; the op returns at once when no
token of the step uses an adapter (vLLM's ``no_lora_flag_cpu``, read outside the graph).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

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
          tiles: list[torch.Tensor], nl: int, no_lora: torch.Tensor, scale: float, add_inputs: bool) -> None:
    if bool(no_lora.item()):  # a CPU tensor: no device sync
        return
    from .triton_ops import lora_linear

    lora_linear(y, x, lora_a, lora_b, tiles, nl, scale, add_inputs=add_inputs)


def _fake(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
          tiles: list[torch.Tensor], nl: int, no_lora: torch.Tensor, scale: float, add_inputs: bool) -> None:
    return None


def _gemm_impl(x: torch.Tensor, ext: torch.Tensor, bias: Optional[torch.Tensor], lora_b: list[torch.Tensor],
               tiles: list[torch.Tensor], nl: int, no_lora: torch.Tensor, n: int, max_loras: int, rank: int,
               scale: float) -> torch.Tensor:
    if bool(no_lora.item()):  # no token uses an adapter: the base GEMM alone, on W (the first n rows)
        return torch.nn.functional.linear(x, ext[:n], None if bias is None else bias[:n])
    from .triton_ops import lora_gemm

    return lora_gemm(x, ext, bias, n, lora_b, tiles, nl, max_loras, rank, scale)


def _gemm_fake(x: torch.Tensor, ext: torch.Tensor, bias: Optional[torch.Tensor], lora_b: list[torch.Tensor],
               tiles: list[torch.Tensor], nl: int, no_lora: torch.Tensor, n: int, max_loras: int, rank: int,
               scale: float) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


def _silu_impl(wide: torch.Tensor, lora_b: list[torch.Tensor], tiles: list[torch.Tensor], nl: int,
               no_lora: torch.Tensor, inter: int, max_loras: int, rank: int, scale: float) -> torch.Tensor:
    from .act_fused import lora_silu_mul

    return lora_silu_mul(wide, lora_b, tiles, nl, inter, max_loras, rank, scale, no_lora=bool(no_lora.item()))


def _silu_fake(wide: torch.Tensor, lora_b: list[torch.Tensor], tiles: list[torch.Tensor], nl: int,
               no_lora: torch.Tensor, inter: int, max_loras: int, rank: int, scale: float) -> torch.Tensor:
    return wide.new_empty((wide.shape[0], inter))


def _norm_impl(wide: torch.Tensor, residual: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor,
               mapping: torch.Tensor, mapped: torch.Tensor, no_lora: torch.Tensor, eps: float, rank: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .norm_fused import lora_add_rms_norm

    return lora_add_rms_norm(wide, residual, lora_b, weight, eps, mapping, mapped, rank, scale,
                             no_lora=bool(no_lora.item()))


def _norm_fake(wide: torch.Tensor, residual: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor,
               mapping: torch.Tensor, mapped: torch.Tensor, no_lora: torch.Tensor, eps: float, rank: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(residual), torch.empty_like(residual)


_OPS = (("lora_linear", _impl, _fake, ["y"]), ("lora_gemm", _gemm_impl, _gemm_fake, ()),
        ("lora_silu_mul", _silu_impl, _silu_fake, ()), ("lora_add_rms_norm", _norm_impl, _norm_fake, ()))


def register_op() -> Any:
    """Define ``torch.ops.peftdeploy.lora_linear`` (split kernels, in place), ``lora_gemm`` (the shrink in
    the base GEMM, see gemm_fused.py), ``lora_silu_mul`` (gate_up's expand in the activation, see
    act_fused.py) and ``lora_add_rms_norm`` (o / down's expand in the next norm, see norm_fused.py) once
    per process (CUDA and, for tests, CPU)."""
    global _LIB
    if _LIB is None:
        from torch.library import Library, infer_schema

        lib = Library("peftdeploy", "FRAGMENT")
        for name, impl, fake, mutates in _OPS:
            lib.define(name + infer_schema(impl, mutates_args=mutates))
            for dev in ("CUDA", "CPU"):
                lib.impl(name, impl, dev)
            torch.library.register_fake(f"peftdeploy::{name}", fake, lib=lib)
        _LIB = lib
    return torch.ops.peftdeploy.lora_linear


def _fallback(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        logger.warning("peftdeploy: LoRA kernels: a layer falls back to vLLM's kernels: %s", why)


def _make_class() -> type:
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from .cpu_weights import live_slots
    from .step_meta import StepMetadata, slots_of
    from .triton_ops import unsupported

    class PunicaWrapperPeftdeployGPU(PunicaWrapperGPU):  # type: ignore[misc,valid-type]
        """vLLM's GPU punica wrapper with peftdeploy's fused Triton kernels for linear layers."""

        def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str,
                     **kwargs: Any):
            super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
            self._pd_op = register_op()
            self._pd_live: dict[int, tuple[tuple[int, ...], frozenset[int]]] = {}
            from . import gemm_fused

            # vLLM's linear LoRA layers convert themselves when handed this wrapper (gemm_fused.py)
            self._pd_fuse_gemm = gemm_fused.enabled() and gemm_fused.install()
            if self._pd_fuse_gemm:
                from . import act_fused

                act_fused.install()  # its MLPs / norms are patched when PEFTDEPLOY_LORA_{ACT,NORM}_FUSE=1
            self._pd_meta = StepMetadata(max_num_batched_tokens, self.max_loras, device,
                                         {"token": self.token_mapping_meta, "prompt": self.prompt_mapping_meta})

        def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                            vocab_size: int, **kwargs: Any) -> None:
            self.is_prefill = mapping.is_prefill
            self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
            self._pd_meta.update({"token": slots_of(mapping.index_mapping, lora_index_to_id),
                                  "prompt": slots_of(mapping.prompt_mapping, lora_index_to_id)})

        def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                            lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                            output_slices: tuple[int, ...], *, buffer: torch.Tensor | None = None,
                            **kwargs: Any) -> None:
            why = unsupported(x, lora_a_stacked, lora_b_stacked)
            if why is None and tuple(output_slices) != tuple(int(b.shape[-2]) for b in lora_b_stacked):
                why = f"output slices {tuple(output_slices)} differ from the B stacks"
            if why is not None:
                _fallback(why)
                return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                               buffer=buffer, **kwargs)
            x2 = x.view(-1, x.shape[-1])
            y2 = y.view(-1, y.shape[-1])
            self._pd_op(y2, x2, list(lora_a_stacked), list(lora_b_stacked), self._pd_meta.tiles,
                        self._pd_meta.layout.nl, self.token_mapping_meta.no_lora_flag_cpu, float(scale),
                        bool(kwargs.get("add_inputs", True)))
            return None

        def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                            lora_b_stacked: torch.Tensor, scale: Any, *, buffer: torch.Tensor | None = None,
                            **kwargs: Any) -> Any:
            """vLLM wraps the logits of every LoRA model (lm_head is a LoRA target module) though adapters
            rarely train it; while no slot's logits B holds a non-zero weight the delta is zero, and its
            shrink + expand over the vocabulary (78 µs a step: 8B shape, H200) are skipped."""
            if torch.compiler.is_compiling() or self._pd_logits_live(lora_b_stacked):
                return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer,
                                               **kwargs)
            return None

        def _pd_logits_live(self, b: torch.Tensor) -> bool:
            live = live_slots(b, self._pd_live)
            return live is None or bool(live)

        def add_lora_gemm(self, x: torch.Tensor, ext: torch.Tensor, bias: torch.Tensor | None, n: int,
                          lora_b_stacked: tuple[torch.Tensor, ...], max_loras: int, rank: int) -> torch.Tensor:
            """A converted layer's whole output: base GEMM with the shrink inside, then one expand launch."""
            return torch.ops.peftdeploy.lora_gemm(x, ext, bias, list(lora_b_stacked), self._pd_meta.tiles,
                                                  self._pd_meta.layout.nl, self.token_mapping_meta.no_lora_flag_cpu,
                                                  n, max_loras, rank, 1.0)

        def add_lora_silu_mul(self, wide: torch.Tensor, lora_b_stacked: tuple[torch.Tensor, ...], inter: int,
                              max_loras: int, rank: int) -> torch.Tensor:
            """silu(gate)·up of a gate_up layer that returned its GEMM's wide output (act_fused.py)."""
            return torch.ops.peftdeploy.lora_silu_mul(wide, list(lora_b_stacked), self._pd_meta.tiles,
                                                      self._pd_meta.layout.nl,
                                                      self.token_mapping_meta.no_lora_flag_cpu, inter, max_loras,
                                                      rank, 1.0)

        def add_lora_rms_norm(self, wide: torch.Tensor, residual: torch.Tensor, lora_b: torch.Tensor,
                              weight: torch.Tensor, eps: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(normalised, residual) of vLLM's fused_add_rms_norm after a row-parallel layer that returned
            its GEMM's wide output, its LoRA expand included (norm_fused.py)."""
            return torch.ops.peftdeploy.lora_add_rms_norm(wide, residual, lora_b, weight,
                                                          self.token_mapping_meta.token_lora_mapping,
                                                          self._pd_meta.tiles[0][-1:],
                                                          self.token_mapping_meta.no_lora_flag_cpu, eps, rank, 1.0)

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
