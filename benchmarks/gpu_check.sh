#!/usr/bin/env bash
# The GPU check on a machine that has only the device image's packages (see docs/performance.md, "How to run"):
# install the carried wheels (benchmarks/gpu_wheels.sh made them) into a temporary folder without any index, make
# `cdd` importable from this checkout, run benchmarks/gpu_check.py (its output folder: $OUT, or --out DIR).
# Arguments go to gpu_check.py. WHEELS names another wheel folder (default .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
tmp=$(mktemp -d)
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$tmp/site" \
    "$wheels"/*.whl || { echo "gpu_check.sh: installing the wheels of $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
ln -s "$PWD" "$tmp/cdd"  # the repository root is the cdd package (pyproject's package-dir)
export PYTHONPATH="$tmp:$PYTHONPATH" PYTHONUNBUFFERED=1
# gpu_check.py stops itself at --limit-s (480 s by default); this is the backstop
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-520}" python3 benchmarks/gpu_check.py "$@"
