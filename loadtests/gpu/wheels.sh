#!/usr/bin/env bash
# Download the wheels the GPU check carries (loadtests/gpu/wheels.txt) for the GPU image's Python
# (cp312, manylinux x86_64) into DIR (default: .whl, ignored by git), one version each, and check
# that they add up to what the list says. Needs pip and PyPI; runs on any machine.
#   bash loadtests/gpu/wheels.sh [DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
list="$root/loadtests/gpu/wheels.txt"
dir="${1:-$root/.whl}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
mkdir -p "$dir"
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" "${pins[@]}"
# Keep exactly the listed versions: two versions of one package stop the install there.
"$python" - "$dir" "$list" <<'PY'
import re, sys
from pathlib import Path
directory, listing = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
wanted = {}
for line in listing.read_text().splitlines():
    pin, _, size = line.partition("#")
    if pin.strip():
        name, version = pin.strip().split("==")
        wanted[(norm(name), version)] = int(size)
found = {}
for wheel in directory.glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if (norm(name), version) in wanted:
        found[(norm(name), version)] = wheel.stat().st_size
    else:
        print(f"removing {wheel.name}: not in {listing.name}")
        wheel.unlink()
missing = set(wanted) - set(found)
changed = {k: (wanted[k], v) for k, v in found.items() if wanted[k] != v}
total = sum(found.values())
print(f"{len(found)} wheels, {total / 2**20:.1f} MiB in {directory}")
if missing or changed:
    sys.exit(f"wheels.sh: missing {sorted(missing)}; sizes differ from the list (listed, found): {changed}")
PY
