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
