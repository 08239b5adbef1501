#!/usr/bin/env bash
# GPU check (see `python -m loadtests.gpu_check --help`): export, eager-vs-TorchScript parity on CUDA,
# throughput, one JSON file. Arguments pass through, e.g. `--out DIR`, `--dry-run` (CPU rehearsal).
# Python: $PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
cd "$root"
exec env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m loadtests.gpu_check "$@"
