# Sourced by scripts/gpu_bench.sh and scripts/gpu_fleet_bench.sh: vLLM 0.26.0 from the two staged parts of
# ../shared/gpu/vllm026_site.tar.xz (part00 copied to /tmp/stage by an earlier call, part01 carried now),
# unpacked once into /tmp/site and put on PYTHONPATH, unless $PY already imports vllm.
if ! $PY -c "import vllm" 2>/dev/null; then
  PART1=${PART1:-.gpu_stage1/vllm026_site.tar.xz.part01}
  if [ ! -f /tmp/site/vllm/__init__.py ]; then
    [ -f /tmp/stage/vllm026_site.tar.xz.part00 ] || { echo "missing /tmp/stage/vllm026_site.tar.xz.part00 (first call; fresh machine?)"; exit 2; }
    [ -f "$PART1" ] || { echo "missing $PART1"; exit 2; }
    cat /tmp/stage/vllm026_site.tar.xz.part00 "$PART1" > /tmp/stage/site.tar.xz
    (cd /tmp/stage && echo "b1188486b08565125f96e40f075abcc8b0250ef060ea799887456aef8b918e37  site.tar.xz" | sha256sum -c) || exit 3
    mkdir -p /tmp/site && tar -xJf /tmp/stage/site.tar.xz -C /tmp/site || exit 4
    rm -f /tmp/stage/site.tar.xz
  fi
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
