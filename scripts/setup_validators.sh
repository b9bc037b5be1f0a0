#!/usr/bin/env bash
# Set up .venv-validators/: the engines' own validators that conflict with .venv (SkyPilot pins
# versions vLLM/Ray disagree with). tests/test_render.py uses .venv-validators/bin/python
# automatically when it exists (or PEFTDEPLOY_SKYPILOT_PYTHON). Idempotent: a second run with
# unchanged inputs only checks a stamp. Prints the venv's python path on its last line.
#
#   bash scripts/setup_validators.sh            # -> /path/to/repo/.venv-validators/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv-validators
STAMP=$VENV/.peftdeploy-validators
# kserve: installed only where it co-installs with skypilot (KSERVE=0 skips it, KSERVE=1 insists)
SKY_PKGS=("skypilot==0.14.1" "pyyaml" "jsonschema")
KSERVE_PKG="kserve==0.21.0"
KSERVE=${KSERVE:-auto}
want=$( (cat scripts/setup_validators.sh; echo "kserve=$KSERVE") | sha256sum | cut -c1-16)
# cheap presence check for the up-to-date path (importing sky takes seconds); the full import runs after installing
present='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("sky", "yaml", "jsonschema")))'
check='import sky, yaml, jsonschema; from sky.utils import schemas, common_utils'
if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "$present" 2>/dev/null; then
  echo "setup-validators: .venv-validators is up to date" >&2
  echo "$VENV/bin/python"; exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
with_kserve=no
if [ "$KSERVE" != 0 ]; then
  echo "setup-validators: installing ${SKY_PKGS[*]} $KSERVE_PKG" >&2
  if $PIP install -q "${SKY_PKGS[@]}" "$KSERVE_PKG" >&2; then
    with_kserve=yes
  elif [ "$KSERVE" = 1 ]; then
    echo "setup-validators: $KSERVE_PKG does not co-install with ${SKY_PKGS[0]}" >&2; exit 1
  else
    echo "setup-validators: $KSERVE_PKG does not co-install with ${SKY_PKGS[0]}; skipping kserve" >&2
  fi
fi
if [ "$with_kserve" = no ]; then
  echo "setup-validators: installing ${SKY_PKGS[*]}" >&2
  $PIP install -q "${SKY_PKGS[@]}" >&2
fi
"$VENV/bin/python" -c "$check; from importlib.metadata import version; print('setup-validators: skypilot', version('skypilot'))" >&2
if [ "$with_kserve" = yes ]; then
  "$VENV/bin/python" -c "from kserve.models import V1beta1PredictorSpec; from importlib.metadata import version; print('setup-validators: kserve', version('kserve'))" >&2
fi
printf '%s\nkserve=%s\n' "$want" "$with_kserve" > "$STAMP"
echo "setup-validators: done in $(( $(date +%s) - start )) s (.venv-validators)" >&2
echo "$VENV/bin/python"
