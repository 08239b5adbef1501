"""The whole suite as two pytest processes side by side, each with its own servers (an experiment).

    python scripts/run_tests.py            # both shards at once; exit status 0 only if both pass
    python scripts/run_tests.py --serial   # one plain `pytest` (what `make test` runs)

Each shard is a set of tests/ folders and files (`SHARDS`; the second takes everything the first does
not), started with CVSERVE_TEST_SHARD=<name> so tests/conftest.py writes its timings to
test-artifacts/durations-shard-<name>.json; they are merged into test-artifacts/durations.json
(wall: the runner's). Each shard's output goes to test-artifacts/pytest-<name>.log and is printed
when both have finished. Every port a test takes is free or chosen, so the two sessions' Ray, Triton
and Prometheus instances do not meet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
ARTIFACTS = ROOT / "test-artifacts"
# Balanced on docs/TEST_DURATIONS.md's serial seconds (about 650 s each).
FIRST = (
    "loadtests", "export", "training", "video", "support", "oip", "client", "test_layers.py", "test_install.py",
)  # fmt: skip


def shards() -> dict[str, list[str]]:
    """Shard name → test paths: the first's entries, and every other test folder or file of tests/."""
    entries = sorted(
        p.name for p in TESTS.iterdir()
        if (p.is_dir() and p.name != "__pycache__") or (p.name.startswith("test_") and p.suffix == ".py")
    )  # fmt: skip
    missing = set(FIRST) - set(entries)
    if missing:
        raise SystemExit(f"scripts/run_tests.py names tests that do not exist: {sorted(missing)}")
    return {
        "a": [f"tests/{name}" for name in entries if name in FIRST],
        "b": [f"tests/{name}" for name in entries if name not in FIRST],
    }


def merge(names: list[str], wall_s: float) -> dict:
    """One durations.json from the shards' files."""
    runs = [json.loads((ARTIFACTS / f"durations-shard-{name}.json").read_text()) for name in names]
    outcomes: dict[str, int] = {}
    for run in runs:
        for part in filter(None, run["outcomes"].split(", ")):
            count, kind = part.split(" ", 1)
            outcomes[kind] = outcomes.get(kind, 0) + int(count)
    return {
        "started": min(run["started"] for run in runs),
        "machine": runs[0]["machine"] + f"; {len(runs)} pytest processes side by side",
        "wall_s": round(wall_s, 1),
        "outcomes": ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())),
        "tests": {k: v for run in runs for k, v in run["tests"].items()},
        "shards": {name: {"wall_s": run["wall_s"]} for name, run in zip(names, runs, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serial", action="store_true", help="one plain pytest process")
    args = parser.parse_args(argv)
    if args.serial:
        return subprocess.run([sys.executable, "-m", "pytest"], cwd=ROOT, check=False).returncode
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    running = {}
    for name, paths in shards().items():
        log = (ARTIFACTS / f"pytest-{name}.log").open("w")
        env = {**os.environ, "CVSERVE_TEST_SHARD": name}
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", *paths], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        running[name] = (process, log)
        print(f"shard {name}: pytest {' '.join(paths)} (output: test-artifacts/pytest-{name}.log)", flush=True)
    codes = {}
    for name, (process, log) in running.items():
        codes[name] = process.wait()
        log.close()
    wall = time.monotonic() - started
    for name in running:
        print(f"\n===== shard {name} (exit {codes[name]}) =====", flush=True)
        print((ARTIFACTS / f"pytest-{name}.log").read_text(), flush=True)
    try:
        merged = merge(list(running), wall)
    except (OSError, ValueError, KeyError) as exc:
        print(f"durations not merged: {exc}", file=sys.stderr)
    else:
        (ARTIFACTS / "durations-parallel.json").write_text(json.dumps(merged, indent=1) + "\n")
        each = ", ".join(f"{n} {s['wall_s']:.0f} s" for n, s in merged["shards"].items())
        print(f"both shards: {merged['outcomes']} in {wall:.0f} s wall ({each})")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
