#!/usr/bin/env bash
# GPU check (see `python -m loadtests.gpu_check --help`): export, parity (fp32 and fp16), model sweep,
# device JPEG decode and the Ray-free HTTP app on CUDA; one JSON file, written after every step.
#   bash loadtests/gpu_check.sh --wheels .whl --out $OUT/gpu_check   # the GPU machine: install the carried wheels first
#   bash loadtests/gpu_check.sh --dry-run --out /tmp/gpu_check       # every step on the CPU, tiny sizes
# --wheels DIR installs DIR/*.whl (bash loadtests/gpu/wheels.sh fetches them) into a fresh target folder
# and puts it on PYTHONPATH; every other argument passes through to the check.
# Python: $PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
args=()
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$root"
if [ -n "$wheels" ]; then
  shopt -s nullglob
  files=("$wheels"/*.whl)
  if [ ${#files[@]} -eq 0 ]; then
    echo "gpu_check: error: no wheels in $wheels (run bash loadtests/gpu/wheels.sh on a machine with PyPI)" >&2
    exit 1
  fi
  site="${TMPDIR:-/tmp}/cvserve-gpu-site"
  rm -rf "$site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${files[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m loadtests.gpu_check "${args[@]}"
