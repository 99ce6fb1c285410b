#!/usr/bin/env bash
# The ONE command run on the lent GPU machine for the GPU check (issue 20):
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
# after `bash scripts/gpu-wheels.sh` here. That machine reaches no package registry: this
# installs the carried wheels (.whl/*.whl) and the node + plugins from the carried source tree
# (no build isolation, no index; the prebuilt .whl/local/*.whl if that fails) into /tmp/site,
# then runs bench/gpu.py, which writes gpu-check.json, gpu-check.md and stages.log to $OUT.
# Extra arguments go to bench/gpu.py (e.g. --only recon-fdk,e2e for a re-run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
SITE=${GPU_CHECK_SITE:-/tmp/site}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
PLUGINS=(plugins/ct-recon plugins/ich-triage plugins/lung-nodules plugins/reformat
         plugins/surface plugins/model-runner plugins/example-threshold)
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
     --target "$SITE")
t0=$(date +%s)
{
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: run scripts/gpu-wheels.sh first and carry .whl"; exit 3; }
  "${PIP[@]}" .whl/*.whl || exit 3
  if ! "${PIP[@]}" --no-build-isolation . "${PLUGINS[@]}"; then
    echo "installing the node from the source tree failed: using .whl/local (built by the prep)"
    "${PIP[@]}" .whl/local/*.whl || exit 3
  fi
  rm -rf build plugins/*/build ./*.egg-info plugins/*/src/*.egg-info
  echo "installed in $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$OUT/install.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 3
export PYTHONPATH="$SITE"
exec "$PY" bench/gpu.py --out "$OUT" "$@"
