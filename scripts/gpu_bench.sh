#!/bin/bash
# GPU run of issues 10 and 11 on one H200 (vLLM 0.26.0 from ../shared/gpu, offline machine, 64 MiB per transfer).
# Measures, in one run on one machine: merged single model (= 1.00), plain multi-LoRA (planner default),
# tuned multi-LoRA (VLLM_LORA_ENABLE_DUAL_STREAM=1, --specialize-active-lora, ...), and the hybrid policy
# (hot adapter l0 merged, the others + the bare backbone as exact delta LoRAs of rank 32); plus the
# planner's KV prediction vs vLLM's "GPU KV cache size", bf16 greedy agreement hybrid vs plain (small
# real-weights model), and a torch-profiler kernel breakdown of multi-LoRA. See scripts/gpu_bench.py.
#
# Exactly how it was run (device tool, kind nvidia-h200; calls back to back: the machine is given back
# after 30 s idle and /tmp is lost with it):
#   here, once:  printf '/.gpu_stage0/\n/.gpu_stage1/\n' >> .git/info/exclude; mkdir -p .gpu_stage0 .gpu_stage1
#                cp ../shared/gpu/vllm026_site.tar.xz.part00 .gpu_stage0/; cp ../shared/gpu/vllm026_site.tar.xz.part01 .gpu_stage1/
#   call 1 (carry .gpu_stage0):  PREP=1 bash scripts/gpu_bench.sh     # stage part00, build model/adapters/deltas
#   call 2 (carry .gpu_stage1):  bash scripts/gpu_bench.sh --servers merged,plain,hybrid,tuned --skip-done
#   call 3 (carry .gpu_stage1):  bash scripts/gpu_bench.sh --servers <the rest> --skip-done
# On a GPU machine with network and vLLM 0.26 installed, one command does it all (no staging):
#   PY=python3 OUT=out/gpu bash scripts/gpu_bench.sh --servers merged,plain,hybrid,tuned,hybrid_tuned,agreement,ds,sp,profile --deadline-s 1e9
# Results: $OUT/gpu_bench.{json,md,log}, $OUT/logs.tar.gz (server logs), $OUT/profile_table.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-/opt/torch/.venv/bin/python3}
OUT=${OUT:-$PWD/out/gpu}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
if [ -n "${PREP:-}" ]; then
  mkdir -p /tmp/stage && cp .gpu_stage0/vllm026_site.tar.xz.part00 /tmp/stage/ && ls -la /tmp/stage
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY scripts/gpu_bench.py --prep --out "$OUT" "$@" 2>&1 | tee "$OUT/prep.log"
  exit ${PIPESTATUS[0]}
fi
. scripts/gpu_vllm026_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY scripts/gpu_bench.py --out "$OUT" --python "$PY" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
exit ${PIPESTATUS[0]}
