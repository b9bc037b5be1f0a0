#!/usr/bin/env bash
# Run the whole test suite (unit + slow end-to-end tests on the CPU vLLM). Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# Two workers (pytest-xdist) by default on a machine with >= 2 cores: each keeps its own CPU cores for vLLM
# and its own e2e ports (tests/conftest.py); tests of one module stay on one worker. PEFTDEPLOY_TEST_WORKERS=0
# runs in one process.
workers=${PEFTDEPLOY_TEST_WORKERS:-$(( $(nproc) >= 2 ? 2 : 0 ))}
par=(); [ "$workers" -gt 1 ] && par=(-n "$workers" --dist loadscope --no-loadscope-reorder)
exec .venv/bin/python -m pytest "${par[@]}" "$@"
