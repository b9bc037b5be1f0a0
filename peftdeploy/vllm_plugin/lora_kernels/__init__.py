"""peftdeploy's own LoRA kernels for vLLM, selected by the plugin in every vLLM process.

vLLM builds its punica wrapper (the object every LoRA layer calls for its LoRA math) with
``resolve_obj_by_qualname(current_platform.get_punica_wrapper())``
(vllm/lora/punica_wrapper/punica_selector.py), looked up at call time. `install()` replaces the
platform class's ``get_punica_wrapper`` so that it names peftdeploy's wrapper:

* CPU: ``cpu.PunicaWrapperPeftdeployCPU`` (segment GEMMs, see cpu.py);
* CUDA: ``gpu.PunicaWrapperPeftdeployGPU`` when ``gpu.available()`` says it can run here.

It reads ``PEFTDEPLOY_LORA_KERNELS`` (``peftdeploy``, the default when unset, or ``vllm``) and keeps
vLLM's own kernels when asked to, when the installed vLLM is not one the kernels were verified
against (`peftdeploy.plan.kernels.VERIFIED`), on other platforms, or when our wrapper cannot be
imported. The server log says which kernels are active and why, in one line, logged when vLLM builds
its LoRA model (``peftdeploy: LoRA kernels: peftdeploy (cpu segment GEMMs) on vLLM 0.32.0`` or
``peftdeploy: LoRA kernels: vllm (<reason>)``), right before vLLM's own ``Using PunicaWrapper...``.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger("vllm.peftdeploy")

CPU_WRAPPER = "peftdeploy.vllm_plugin.lora_kernels.cpu.PunicaWrapperPeftdeployCPU"
GPU_WRAPPER = "peftdeploy.vllm_plugin.lora_kernels.gpu.PunicaWrapperPeftdeployGPU"
_MARK = "_peftdeploy_punica_wrapper"
_lock = threading.Lock()
_state: dict[str, Any] = {"result": None}


def install() -> str:
    """Select peftdeploy's punica wrapper in this process if possible. Idempotent; never raises.

    Returns ``"peftdeploy"`` or ``"vllm"`` (the kernels the LoRA layers of this process will use). The
    one INFO line saying which kernels are active, and why, is logged when vLLM asks the platform for
    its punica wrapper, i.e. once in the process that builds the LoRA model (the engine's worker),
    where vLLM's logging is set up, and only if LoRA is enabled.
    """
    with _lock:
        if _state["result"] is not None:
            return _state["result"]
        try:
            result, level, line = _choose()
        except Exception as e:  # noqa: BLE001 - a plugin must never take vLLM down
            result, level, line = "vllm", logging.WARNING, (
                f"peftdeploy: LoRA kernels: vllm (choosing peftdeploy's failed: {type(e).__name__}: {e})")
        try:
            _patch(result, level, line)
        except Exception as e:  # noqa: BLE001
            result = "vllm"
            logger.warning("peftdeploy: LoRA kernels: vllm (cannot select a punica wrapper: %s: %s)",
                           type(e).__name__, e)
        logger.debug("%s [pid %d]", line, os.getpid())
        _state["result"] = result
        if result == "peftdeploy":  # CPU: compile the LoRA model like the model without LoRA (cpu_compile.py); the
            from .cpu_compile import install as install_compile  # hook asks PEFTDEPLOY_LORA_COMPILE per engine

            install_compile(active_now)
        return result


def _choose() -> tuple[str, int, str]:
    from ...plan.kernels import ENV, is_verified, verified_versions

    choice = _env_choice()
    if choice == "vllm":
        return "vllm", logging.INFO, f"peftdeploy: LoRA kernels: vllm ({ENV}=vllm)"
    if choice not in ("peftdeploy", "auto"):
        return "vllm", logging.WARNING, (f"peftdeploy: LoRA kernels: vllm ({ENV}={choice!r} is not one of "
                                         "peftdeploy, vllm, auto)")
    import vllm
    from vllm.platforms import current_platform

    version = str(getattr(vllm, "__version__", "?"))
    if current_platform.is_cpu():
        device, what = "cpu", "cpu segment GEMMs"
    elif current_platform.is_cuda():
        device, what = "cuda", "fused Triton kernels"
    else:
        return "vllm", logging.INFO, (f"peftdeploy: LoRA kernels: vllm (peftdeploy has no LoRA kernels for the "
                                      f"{type(current_platform).__name__} platform)")
    if not is_verified(device, version):
        return "vllm", logging.WARNING, (
            f"peftdeploy: LoRA kernels: vllm (vLLM {version} is not verified for peftdeploy's {device} kernels; "
            f"verified: {', '.join(verified_versions(device)) or 'none'})")
    try:
        if device == "cpu":
            from . import cpu  # noqa: F401 - importable here, before vLLM resolves the qualname
        else:
            from .gpu import available  # type: ignore[import-not-found]

            ok, why = available()
            if not ok:
                return "vllm", logging.WARNING, f"peftdeploy: LoRA kernels: vllm (peftdeploy's CUDA kernels: {why})"
    except Exception as e:  # noqa: BLE001 - import failure: keep vLLM's kernels
        return "vllm", logging.WARNING, (f"peftdeploy: LoRA kernels: vllm (cannot import peftdeploy's {device} "
                                         f"kernels: {type(e).__name__}: {e})")
    return "peftdeploy", logging.INFO, f"peftdeploy: LoRA kernels: peftdeploy ({what}) on vLLM {version}"


def _patch(result: str, level: int, line: str) -> None:
    """Point the platform's get_punica_wrapper at our wrapper (or keep vLLM's) and say so on first use."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    current = cls.get_punica_wrapper
    original = getattr(current, "__wrapped__", None) if getattr(current, _MARK, False) else current
    if original is None:
        original = current
    if result == "peftdeploy":
        qualname = CPU_WRAPPER if current_platform.is_cpu() else GPU_WRAPPER
    else:
        qualname = None
    said = [False]

    def get_punica_wrapper(klass: Any) -> str:
        if not said[0]:
            said[0] = True
            logger.log(level, "%s", line)
        return qualname if qualname is not None else original()

    setattr(get_punica_wrapper, _MARK, True)
    get_punica_wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    cls.get_punica_wrapper = classmethod(get_punica_wrapper)  # type: ignore[method-assign]


def active() -> str | None:
    """What `install()` chose in this process (None before it ran)."""
    return _state["result"]


def _env_choice() -> str:
    """``PEFTDEPLOY_LORA_KERNELS`` as it reads now (unset: ``peftdeploy``)."""
    from ...plan.kernels import ENV

    return os.environ.get(ENV, "").strip().lower() or "peftdeploy"


def active_now() -> str | None:
    """`active()`, unless ``PEFTDEPLOY_LORA_KERNELS`` now asks for vLLM's: the engine processes vLLM starts
    from here read the variable afresh (a script may build one engine per kernel choice in one process)."""
    return active() if _env_choice() in ("peftdeploy", "auto") else "vllm"


__all__ = ["CPU_WRAPPER", "GPU_WRAPPER", "active", "active_now", "install"]
