"""peftdeploy's Triton LoRA kernels under Triton's interpreter: the checks live in
tests/lora_kernels_interp.py and run here in a child process with ``TRITON_INTERPRET=1`` (Triton reads
it at import, and other test modules have imported Triton by the time this one runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

HERE = Path(__file__).parent


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(HERE / "lora_kernels_interp.py")], env=env, capture_output=True, text=True,
                       timeout=900, cwd=HERE.parent)
    tail = p.stdout[-6000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    assert " passed" in p.stdout and " failed" not in p.stdout and " skipped" not in p.stdout, tail


def test_shipped_tuned_configs_load_and_cover_the_measured_shapes():
    """The H200 sweep's table (peftdeploy/data/lora_kernels/tuned-h200.json) ships and is what choose_config
    returns for the Llama-3-8B shapes it was measured on; other shapes get the heuristic."""
    from peftdeploy.vllm_plugin.lora_kernels import triton_ops as O

    shapes = {(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,))}
    assert len(O.TUNED) == 4 * len(O.BUCKET_TOKENS)
    for k, widths in shapes:
        for t in (1, 64, 200, 1000, 1028, 2000, 2956, 8192):
            assert O.choose_config(t, k, widths, 16) == O.TUNED[O.config_key(t, k, widths, 16)]
    odd = O.choose_config(64, 2048, (2048, 512, 512), 16)
    assert odd == O.default_config(64, 2048, (2048, 512, 512), 16) and not odd.fused


def test_prefill_steps_keep_their_shrink_parallelism():
    """A ~1000-token prefill step (64 running decode tokens + one prompt) has only ~17 tiles of 64 tokens:
    without a deeper K split one program walked down_proj's whole K = 14336 (lease 2: 88.9 µs against an
    11 µs floor). The heuristic splits K until tiles x splits reaches SHRINK_PROGRAMS, and a tuned
    configuration keeps the parallelism it was measured with on other step sizes of its bucket."""
    from peftdeploy.vllm_plugin.lora_kernels import triton_ops as O

    assert [O.token_bucket(t) for t in (64, 1000, 1028, 2048, 2956, 8192)] == \
        ["t64", "t1024", "t2048", "t2048", "t4096", "tbig"]
    for t, k in ((1028, 14336), (1028, 4096), (2956, 14336), (8192, 4096)):
        c = O.default_config(t, k, (4096,), 16)
        tiles = -(-t // c.bm)
        assert tiles * c.split_k >= O.SHRINK_PROGRAMS or c.split_k == k // 256, (t, k, c)
        assert c.split_k & (c.split_k - 1) == 0 and k // c.split_k >= 256
    assert O.default_config(8192, 4096, (4096,), 16).split_k == 2  # what the lease-2 sweep found there
    cfg = O.Config(fused=False, bm=64, bn=128, bk=128, split_k=8)
    for bucket, ref in O.BUCKET_TOKENS.items():
        if ref > 256:
            assert O.token_bucket(ref) == bucket
            assert O.step_split(cfg, ref, 14336) == 8  # the measured size: the measured split
    assert O.step_split(cfg, 2048, 14336) == 4  # twice the tiles of 1028: half the splits
    assert O.step_split(cfg, 1100, 14336) == 8
    assert O.step_split(cfg, 4096, 14336) == 8 and O.step_split(cfg, 4200, 14336) == 16 and O.step_split(cfg, 3000, 14336) == 8
    assert O.step_split(cfg, 300, 14336) == 32  # t1024 measured at 1024: 5 tiles instead of 16
    assert O.step_split(cfg, 300, 2048) == 8  # never a K chunk under 256
    assert O.step_split(cfg, 64, 14336) == 8  # decode (CUDA graphs): as tuned
    assert O.step_split(O.Config(fused=True, bm=64, bn=128, bk=64), 2048, 4096) == 1


def test_gemm_fused_configs_one_per_prefill_and_overridable(monkeypatch):
    """The GEMM-fused expand compiles a handful of configurations only: one per decode tile height and one
    for every prefill size (vLLM's profile run compiles it before serving: the H200 server log showed Triton
    compiling during inference when per-bucket configurations were used); a 'gemm:' entry overrides."""
    import json

    from peftdeploy.vllm_plugin.lora_kernels import triton_ops as O

    qkv, gate_up = (4096, 1024, 1024), (14336, 14336)
    prefill = {O.gemm_config(t, 4096, qkv, 16) for t in (257, 1000, 1028, 2956, 8192)}
    assert len(prefill) == 1 and next(iter(prefill)).bm == 64
    assert [O.gemm_config(t, 4096, qkv, 16).bm for t in (1, 64, 65, 256)] == [16, 16, 32, 32]
    assert O.gemm_config(64, 4096, qkv, 16).bn == 64 and O.gemm_config(64, 4096, gate_up, 16).n_iters == 2
    cfg = {"fused": True, "bm": 32, "bn": 128, "bk": 16, "n_iters": 1}
    monkeypatch.setenv("PEFTDEPLOY_LORA_KERNEL_CONFIG", json.dumps({"gemm:" + O.config_key(64, 4096, qkv, 16): cfg}))
    monkeypatch.setattr(O, "_OVERRIDES", None)
    assert O.gemm_config(64, 4096, qkv, 16) == O.Config(**cfg)
    assert O.gemm_config(64, 4096, gate_up, 16).bm == 16  # other keys keep the default


@pytest.mark.parametrize("env,interp", [(None, None), ("1", None), ("1", "1"), ("0", None)])
def test_pdl_only_when_asked_on_cuda(monkeypatch, env, interp):
    """Programmatic dependent launch of the GEMM-fused expand is opt-in (PEFTDEPLOY_LORA_PDL=1, not yet measured
    on a GPU), never on a CPU tensor or under the interpreter, where Triton has no grid dependency control."""
    import torch

    from peftdeploy.vllm_plugin.lora_kernels import triton_ops as O

    for k, v in ((O.PDL_ENV, env), ("TRITON_INTERPRET", interp)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    assert O.use_pdl(torch.device("cpu")) is False
    if torch.cuda.is_available():
        want = env == "1" and interp is None and torch.cuda.get_device_capability()[0] >= 9
        assert O.use_pdl(torch.device("cuda")) is want
