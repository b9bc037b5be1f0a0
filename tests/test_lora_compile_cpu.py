"""PEFTDEPLOY_LORA_COMPILE=1 (peftdeploy/vllm_plugin/lora_kernels/cpu_compile.py): the CPU platform's config
hook keeps the compile mode vLLM-CPU picks for a model without LoRA, only when asked and only with
peftdeploy's kernels active; otherwise vLLM's eager setting stays. vLLM's own hook is stubbed (it sets
DYNAMO_TRACE_ONCE, then NONE for LoRA, as vllm/platforms/cpu.py 0.32 does)."""
from __future__ import annotations

import importlib.util
import types

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM not installed", allow_module_level=True)


@pytest.fixture
def platform(monkeypatch):
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU vLLM only")
    cls = type(current_platform)

    def stub(klass, cfg):
        cc = cfg.compilation_config
        if cc.mode == CompilationMode.VLLM_COMPILE:
            cc.mode, cc.backend = CompilationMode.DYNAMO_TRACE_ONCE, "inductor"
        if cfg.lora_config is not None:
            cc.mode = CompilationMode.NONE

    monkeypatch.setattr(cls, "check_and_update_config", classmethod(stub))
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE", raising=False)
    return cls


def _cfg(lora: bool):
    from vllm.config import CompilationMode

    cc = types.SimpleNamespace(mode=CompilationMode.VLLM_COMPILE, backend="")
    return types.SimpleNamespace(compilation_config=cc, lora_config=object() if lora else None)


@pytest.mark.parametrize("env,kernels,lora,expect", [
    ("1", "peftdeploy", True, "DYNAMO_TRACE_ONCE"),
    ("0", "peftdeploy", True, "NONE"),
    (None, "peftdeploy", True, "NONE"),
    ("1", "vllm", True, "NONE"),
    ("1", "peftdeploy", False, "DYNAMO_TRACE_ONCE"),
])
def test_compile_mode(platform, monkeypatch, env, kernels, lora, expect):
    import os

    from peftdeploy.vllm_plugin.lora_kernels import cpu_compile

    if env is None:
        monkeypatch.delenv(cpu_compile.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_compile.ENV, env)
    assert cpu_compile.install(lambda: kernels)
    assert cpu_compile.install(lambda: kernels)  # idempotent
    cfg = _cfg(lora)
    platform.check_and_update_config(cfg)
    assert cfg.compilation_config.mode.name == expect
    compiled_lora = lora and expect == "DYNAMO_TRACE_ONCE"
    assert (os.environ.get("VLLM_DISABLE_COMPILE_CACHE") == "1") == compiled_lora
