#!/bin/bash
# GPU run of issue 21 on nvidia-h200-x2: the adapter-aware fleet (issue 20) vs two identical multi-LoRA engines,
# both behind vllm-router, one engine per GPU (CUDA_VISIBLE_DEVICES from the fleet planner). See
# scripts/gpu_fleet_bench.py. vLLM 0.26.0 comes from ../shared/gpu as for scripts/gpu_bench.sh; vllm-router
# (not on the offline GPU machine) from wheels staged here. A device call carries 64 MiB at most, so:
#
#   here, once:  printf '/.gpu_stage0/\n/.gpu_stage1/\n/.gpu_stage_router/\n' >> .git/info/exclude
#                mkdir -p .gpu_stage0 .gpu_stage1 .gpu_stage_router
#                cp ../shared/gpu/vllm026_site.tar.xz.part00 .gpu_stage0/; cp ../shared/gpu/vllm026_site.tar.xz.part01 .gpu_stage1/
#                .venv/bin/pip download --no-deps -d .gpu_stage_router vllm-router==0.1.17 orjson setproctitle
#   call 1 (kind nvidia-h200-x2, carry .gpu_stage0):        PREP=1 bash scripts/gpu_fleet_bench.sh
#   call 2 (carry .gpu_stage_router):                        ROUTER=1 bash scripts/gpu_fleet_bench.sh
#   call 3 (carry .gpu_stage1):                              bash scripts/gpu_fleet_bench.sh
# (calls back to back: the machine and its /tmp are given back after 30 s idle.)
# On a 2-GPU machine with network, vLLM and `pip install 'peftdeploy[fleet]'`: PY=python3 bash scripts/gpu_fleet_bench.sh
# Results: $OUT/gpu_fleet_bench.{json,md,log}, $OUT/logs.tar.gz (router + engine logs).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-/opt/torch/.venv/bin/python3}
OUT=${OUT:-$PWD/out/gpu-fleet}; mkdir -p "$OUT"; export OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
if [ -n "${PREP:-}" ]; then
  mkdir -p /tmp/stage && cp .gpu_stage0/vllm026_site.tar.xz.part00 /tmp/stage/ && ls -la /tmp/stage
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  exit 0
fi
if [ -n "${ROUTER:-}" ]; then
  $PY -m pip install --no-deps --no-index --target /tmp/router .gpu_stage_router/*.whl && ls /tmp/router/bin
  exit $?
fi
if [ -d /tmp/router ]; then
  export PYTHONPATH=$PYTHONPATH:/tmp/router PATH=/tmp/router/bin:$PATH
fi
command -v vllm-router >/dev/null || $PY -c "import vllm_router" 2>/dev/null || { echo "vllm-router missing (call 2, or pip install 'peftdeploy[fleet]')"; exit 2; }
. scripts/gpu_vllm026_site.sh
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
$PY scripts/gpu_fleet_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_fleet_bench.log"
rc=${PIPESTATUS[0]}
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null
exit $rc
