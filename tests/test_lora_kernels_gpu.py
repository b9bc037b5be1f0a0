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
    assert len(O.TUNED) == 4 * 5
    for k, widths in shapes:
        for t in (1, 64, 200, 1000, 8192):
            assert O.choose_config(t, k, widths, 16) == O.TUNED[O.config_key(t, k, widths, 16)]
    odd = O.choose_config(64, 2048, (2048, 512, 512), 16)
    assert odd == O.default_config(64, 2048, (2048, 512, 512), 16) and not odd.fused
