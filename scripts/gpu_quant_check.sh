#!/bin/bash
# Issue 19, GPU part: a GPTQ w4a16 and an fp8 (dynamic) merged 1B-class model, made on the GPU box by
# llm-compressor through peftdeploy's quantize step and served by vLLM 0.26 through `peftdeploy up`.
# Random weights (TinyLlama-1.1B shape) + a random rank-8 adapter, merged in full precision first.
#
# What travels (the box is offline; 64 MiB per call):
#   * vLLM 0.26 site: ../shared/gpu/vllm026_site.tar.xz.part00 + part01 (41.6 MiB each: two calls, as
#     scripts/gpu_bench.sh does; skip call 1 when the held machine already has /tmp/site from it)
#   * llm-compressor 0.14.0.1 + compressed-tensors 0.19.0 + datasets/loguru/dill/multiprocess wheels
#     (1.6 MiB, .gpu_llmc/), installed into /tmp/llmc_site: the quantize tool env there is the image's
#     python3 (torch 2.11 cu130, transformers 5.17, accelerate 1.15) with that site, then vLLM's site (for
#     pydantic, which the image lacks), on its path
#   * compressed-tensors 0.17.0 (what vLLM 0.26 pins; its trimmed site leaves it out) + loguru
#     (.gpu_llmc/serve/), installed into /tmp/ct_site for the serving side
#
# Here, once (in the repo root):
#   printf '/.gpu_stage0/\n/.gpu_stage1/\n' >> .git/info/exclude     # (.gpu_llmc/ is in .gitignore)
#   mkdir -p .gpu_stage0 .gpu_stage1 && cp ../shared/gpu/vllm026_site.tar.xz.part00 .gpu_stage0/ \
#     && cp ../shared/gpu/vllm026_site.tar.xz.part01 .gpu_stage1/
#   bash scripts/gpu_quant_check.sh --wheels          # downloads the wheels into .gpu_llmc/
# Device calls (kind nvidia-h200, back to back: /tmp is lost when the machine goes back):
#   call 1 (carry [".gpu_stage0"], ~20 s):   PREP=1 bash scripts/gpu_quant_check.sh
#   call 2 (carry [".gpu_stage1", ".gpu_llmc"], timeout_s 560):  bash scripts/gpu_quant_check.sh
# Results: $OUT/gpu_quant.json (one row per scheme), $OUT/gpu_quant.log, $OUT/up-*.log (vLLM logs).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .gpu_llmc && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu_llmc llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 loguru==0.7.3 dill==0.4.1 \
    multiprocess==0.70.19 && mkdir -p .gpu_llmc/serve && python3 -m pip download -q --no-deps --only-binary=:all: \
    -d .gpu_llmc/serve compressed-tensors==0.17.0 loguru==0.7.3 && ls -la .gpu_llmc .gpu_llmc/serve && du -sh .gpu_llmc; exit $?
fi
PY=${PY:-/opt/torch/.venv/bin/python3}
OUT=${OUT:-$ROOT/out/gpu_quant}; mkdir -p "$OUT"
if [ -n "${PREP:-}" ]; then
  mkdir -p /tmp/stage && cp .gpu_stage0/vllm026_site.tar.xz.part00 /tmp/stage/ && ls -la /tmp/stage; exit $?
fi
T0=$(date +%s)
LOG=$OUT/gpu_quant.log
exec > >(tee "$LOG") 2>&1
if [ ! -f /tmp/site/vllm/__init__.py ]; then
  PART1=${PART1:-.gpu_stage1/vllm026_site.tar.xz.part01}
  [ -f /tmp/stage/vllm026_site.tar.xz.part00 ] || { echo "missing /tmp/stage/vllm026_site.tar.xz.part00 (run call 1 first)"; exit 2; }
  cat /tmp/stage/vllm026_site.tar.xz.part00 "$PART1" > /tmp/stage/site.tar.xz || exit 2
  (cd /tmp/stage && echo "b1188486b08565125f96e40f075abcc8b0250ef060ea799887456aef8b918e37  site.tar.xz" | sha256sum -c) || exit 3
  mkdir -p /tmp/site && tar -xJf /tmp/stage/site.tar.xz -C /tmp/site || exit 4
  rm -f /tmp/stage/site.tar.xz
fi
# the quantize tool env: the image's python3 + llm-compressor's site (never on vLLM's path)
if [ ! -f /tmp/llmc_site/llmcompressor/__init__.py ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/llmc_site .gpu_llmc/*.whl || exit 5
fi
if [ ! -f /tmp/ct_site/compressed_tensors/__init__.py ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ct_site .gpu_llmc/serve/*.whl || exit 5
fi
printf '#!/bin/sh\nPYTHONPATH=/tmp/llmc_site:/tmp/site exec %s "$@"\n' "$PY" > /tmp/qpy && chmod +x /tmp/qpy
export PEFTDEPLOY_QUANTIZE_PYTHON=/tmp/qpy PEFTDEPLOY_CACHE=/tmp/pdcache PYTHONPATH=$ROOT:/tmp/site:/tmp/ct_site \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
       PYTHONUNBUFFERED=1 PD_GPU_MODEL=/tmp/m1b PD_GPU_ADAPTER=/tmp/lora1b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
/tmp/qpy -c "import llmcompressor, compressed_tensors, torch; print('tool env: llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | grep -v WARNING || exit 6
$PY -c "import vllm, compressed_tensors; print('serving env: vllm', vllm.__version__, 'compressed-tensors', compressed_tensors.__version__)" || exit 7
[ -f /tmp/m1b/model.safetensors ] || [ -f /tmp/m1b/model.safetensors.index.json ] || $PY scripts/gpu_quant/make_1b.py /tmp/m1b /tmp/lora1b || exit 8
PD="$PY -m peftdeploy.cli"
echo "[]" > "$OUT/gpu_quant.json"
for r in w4a16-gptq fp8; do
  rec=scripts/gpu_quant/$r.yaml
  t=$(date +%s)
  echo "=== $r: peftdeploy up $rec (merge, quantize with llm-compressor, serve with vLLM 0.26) ==="
  $PD up "$rec" --detach --json --device cuda --timeout 300 --log-file "$OUT/up-$r.log" > "/tmp/up-$r.json"
  rc=$?
  $PY - "$r" "$rc" "/tmp/up-$r.json" "$OUT/up-$r.log" "$OUT/gpu_quant.json" "$(( $(date +%s) - t ))" <<'PYEOF'
import json, re, sys, urllib.request
name, rc, upj, vlog, outj, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
row = {"recipe": name, "up_rc": rc, "up_seconds": secs}
try:
    info = json.load(open(upj))
except Exception as e:
    info = {}
    row["error"] = f"no up --json output ({e})"
q = (info.get("merge") or {}).get("quantize") or {}
row.update(scheme=q.get("scheme"), method=q.get("method"), quantize_seconds=q.get("seconds"), path=q.get("path"))
if q.get("path"):
    cfg = json.load(open(q["path"] + "/config.json")).get("quantization_config", {})
    g = next(iter(cfg.get("config_groups", {}).values()), {})
    row.update(quant_method=cfg.get("quant_method"), format=cfg.get("format"), ct_version=cfg.get("version"),
               weights=g.get("weights"), input_activations=g.get("input_activations"))
try:
    log = open(vlog, errors="replace").read()
    row["vllm_kernel_lines"] = [l.strip()[-200:] for l in log.splitlines()
                                if re.search(r"(Machete|Marlin|Cutlass|CUTLASS|kernel|compressed.tensors|Fp8|FP8)", l)
                                and "WARNING" not in l][:8]
except OSError:
    pass
if rc == 0 and info.get("endpoint"):
    base, model = info["endpoint"], info.get("base_model")
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/completions", body, {"Content-Type": "application/json"})
    try:
        r = json.load(urllib.request.urlopen(req, timeout=60))
        row.update(completion_ok=True, completion_tokens=r["usage"]["completion_tokens"], text=r["choices"][0]["text"])
    except Exception as e:
        row.update(completion_ok=False, completion_error=str(e)[:300])
rows = json.load(open(outj)); rows.append(row); json.dump(rows, open(outj, "w"), indent=2)
print(json.dumps({k: v for k, v in row.items() if k != "vllm_kernel_lines"}))
for l in row.get("vllm_kernel_lines", []):
    print("   vllm:", l)
PYEOF
  $PD down "gpu-$r" >/dev/null 2>&1 || true
  [ $rc -eq 0 ] || { echo "--- up failed (exit $rc): tail of its log ---"; tail -40 "$OUT/up-$r.log" 2>/dev/null; }
done
echo "=== summary (total $(( $(date +%s) - T0 )) s) ==="
$PY -c "
import json; rows = json.load(open('$OUT/gpu_quant.json'))
print(f\"{'recipe':<12}{'scheme':<8}{'method':<7}{'format':<22}{'quantize s':>11}{'up s':>7}  served+answered\")
for r in rows: print(f\"{r['recipe']:<12}{str(r.get('scheme')):<8}{str(r.get('method')):<7}{str(r.get('format')):<22}{str(r.get('quantize_seconds')):>11}{r['up_seconds']:>7}  {r.get('completion_ok', False)}\")
ok = all(r.get('completion_ok') for r in rows) and len(rows) == 2
print('RESULT:', 'PASS' if ok else 'FAIL'); raise SystemExit(0 if ok else 1)"
