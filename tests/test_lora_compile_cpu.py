"""peftdeploy/vllm_plugin/lora_kernels/cpu_compile.py: the CPU platform's config hook keeps the compile mode
vLLM-CPU picks for a model without LoRA when peftdeploy's kernels are active (the default;
PEFTDEPLOY_LORA_COMPILE=0 keeps vLLM's eager setting), and keys vLLM's compile cache with the kernels'
fingerprint. vLLM's own hook is stubbed (it sets DYNAMO_TRACE_ONCE, then NONE for LoRA, as
vllm/platforms/cpu.py 0.32 does)."""
from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

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
    return types.SimpleNamespace(compilation_config=cc, lora_config=object() if lora else None,
                                 additional_config={"other": 1})


@pytest.mark.parametrize("env,kernels,lora,expect", [
    ("1", "peftdeploy", True, "DYNAMO_TRACE_ONCE"),
    ("0", "peftdeploy", True, "NONE"),
    (None, "peftdeploy", True, "DYNAMO_TRACE_ONCE"),  # the default
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
    # vLLM's compile cache stays on, keyed with the kernels' sources (vLLM hashes additional_config)
    assert os.environ.get("VLLM_DISABLE_COMPILE_CACHE") is None
    want = {"other": 1, cpu_compile.CACHE_KEY: cpu_compile.fingerprint()} if compiled_lora else {"other": 1}
    assert cfg.additional_config == want


def test_fingerprint_follows_the_kernel_sources(tmp_path, monkeypatch):
    from peftdeploy.vllm_plugin.lora_kernels import cpu_compile

    fp = cpu_compile.fingerprint()
    assert len(fp) == 16 and fp == cpu_compile.fingerprint()
    pkg = tmp_path / "lora_kernels"
    pkg.mkdir()
    src = Path(cpu_compile.__file__).parent
    for p in src.glob("*.py"):
        (pkg / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(cpu_compile, "__file__", str(pkg / "cpu_compile.py"))
    cpu_compile.fingerprint.cache_clear()
    try:
        assert cpu_compile.fingerprint() == fp  # the same sources elsewhere: the same key
        (pkg / "cpu.py").write_bytes((pkg / "cpu.py").read_bytes() + b"\n# changed\n")
        cpu_compile.fingerprint.cache_clear()
        assert cpu_compile.fingerprint() != fp
    finally:
        cpu_compile.fingerprint.cache_clear()


def test_object_additional_config_turns_the_cache_off(platform, monkeypatch):
    from peftdeploy.vllm_plugin.lora_kernels import cpu_compile

    monkeypatch.delenv(cpu_compile.ENV, raising=False)
    assert cpu_compile.install(lambda: "peftdeploy")
    cfg = _cfg(True)
    cfg.additional_config = types.SimpleNamespace(compute_hash=lambda: "x")  # not a dict: cannot add a key
    platform.check_and_update_config(cfg)
    assert cfg.compilation_config.mode.name == "DYNAMO_TRACE_ONCE"
    assert os.environ.get("VLLM_DISABLE_COMPILE_CACHE") == "1"  # the platform fixture restores it
