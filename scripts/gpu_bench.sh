#!/bin/bash
# GPU run of issue 10 (second device call; the first one copied part00 to /tmp/stage):
#   reassemble + check + extract the vLLM 0.26.0 site (/work/shared/gpu), then scripts/gpu_bench.py:
#   8B-shaped dummy model + 8 random rank-16 all-linear adapters; no-LoRA (= merged) server and one
#   LoRA server (max_loras 8): base traffic, 1 adapter, 8 adapters Zipf(1.0); peftdeploy's load
#   generator, 64 concurrent, ~200-word prompts, 128 output tokens, warm-up + 2 runs;
#   KV tokens vLLM reports vs the planner's prediction. Results: $OUT/gpu_bench.{json,md,png} + logs.
# Usage (repo root): PART1=path/to/vllm026_site.tar.xz.part01 bash scripts/gpu_bench.sh [gpu_bench.py flags]
#   e.g. --with-max-loras-4 (a third server; adds ~2 min), --eager, --runs 3
set -u
cd "$(dirname "$0")/.."
PY=${PY:-/opt/torch/.venv/bin/python3}
OUT=${OUT:-$PWD/out/gpu}; mkdir -p "$OUT"; export OUT
PART1=${PART1:-.gpu_stage/vllm026_site.tar.xz.part01}
if [ ! -f /tmp/site/vllm/__init__.py ]; then
  [ -f /tmp/stage/vllm026_site.tar.xz.part00 ] || { echo "missing /tmp/stage/vllm026_site.tar.xz.part00 (first call)"; exit 2; }
  [ -f "$PART1" ] || { echo "missing $PART1"; exit 2; }
  cat /tmp/stage/vllm026_site.tar.xz.part00 "$PART1" > /tmp/stage/site.tar.xz
  (cd /tmp/stage && echo "b1188486b08565125f96e40f075abcc8b0250ef060ea799887456aef8b918e37  site.tar.xz" | sha256sum -c) || exit 3
  mkdir -p /tmp/site && tar -xJf /tmp/stage/site.tar.xz -C /tmp/site || exit 4
  rm -f /tmp/stage/site.tar.xz
fi
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY scripts/gpu_bench.py --out "$OUT" --python "$PY" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
exit ${PIPESTATUS[0]}
