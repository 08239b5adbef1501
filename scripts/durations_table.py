"""Turn a test run's phase timings (test-artifacts/durations.json, written by tests/conftest.py) into the
committed table docs/TEST_DURATIONS.md: wall time, seconds per folder (setup and call), how busy the
machine's cores were meanwhile, slowest tests.

    python scripts/durations_table.py [--json test-artifacts/durations.json] [--out docs/TEST_DURATIONS.md]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOWEST = 30


def folder(nodeid: str) -> str:
    """tests/<folder>/ of a test id (tests/ itself for top-level files)."""
    parts = nodeid.split("::")[0].split("/")
    return "/".join(parts[:2]) + "/" if len(parts) > 2 else "tests/"


def table(run: dict) -> str:
    """The markdown page for one run's timings."""
    tests: dict[str, dict[str, float]] = run["tests"]
    cpu: dict[str, float] = run.get("machine_cpu_s", {})  # runs before it was recorded have none
    by_folder: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid, phases in tests.items():
        by_folder[folder(nodeid)].update({**phases, "tests": 1, "cpu": cpu.get(nodeid, 0.0)})
    phase_sum = sum(sum(p.values()) for p in tests.values())
    cores = int(run["machine"].split()[0])
    lines = [
        "# Test durations",
        "",
        f"One `make test` run: {run['started']}, {run['machine']}; {len(tests)} tests "
        f"({run['outcomes']}), **{run['wall_s']:.0f} s wall** (setup + call + teardown summed: "
        f"{phase_sum:.0f} s). Written by `tests/conftest.py` to `test-artifacts/durations.json`; "
        "this page by `python scripts/durations_table.py`. Setup includes the session fixtures a "
        "folder's first test starts (Ray Serve, tritonserver, Prometheus, exports).",
        "",
        "\"Cores busy\" is the CPU seconds the whole machine spent during a folder's tests (servers and "
        f"subprocesses included; /proc/stat), over their wall seconds: {cores} would mean every core was "
        "busy, so the gap is what running tests side by side could at most win there. "
        + (
            f"Over the whole run: {sum(cpu.values()) / phase_sum:.2f} of {cores}."
            if cpu
            else "This run did not record it."
        ),
        "",
        "| folder | tests | setup s | call s | teardown s | total s | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(by_folder.items(), key=lambda kv: -sum(kv[1][k] for k in ("setup", "call", "teardown")))
    for name, c in ranked:
        total = c["setup"] + c["call"] + c["teardown"]
        busy = f"{c['cpu'] / total:.2f}" if cpu and total else "-"
        lines.append(
            f"| `{name}` | {c['tests']} | {c['setup']:.0f} | {c['call']:.0f} | {c['teardown']:.0f} | {total:.0f} "
            f"| {busy} |"
        )
    lines += ["", f"## The {SLOWEST} slowest tests (setup + call)", ""]
    lines += ["| test | setup s | call s | cores busy |", "|---|---:|---:|---:|"]
    slowest = sorted(tests.items(), key=lambda kv: -(kv[1].get("setup", 0) + kv[1].get("call", 0)))
    for nodeid, phases in slowest[:SLOWEST]:
        total = sum(phases.values())
        busy = f"{cpu[nodeid] / total:.2f}" if nodeid in cpu and total else "-"
        lines.append(f"| `{nodeid}` | {phases.get('setup', 0):.1f} | {phases.get('call', 0):.1f} | {busy} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "test-artifacts" / "durations.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "TEST_DURATIONS.md")
    args = parser.parse_args(argv)
    args.out.write_text(table(json.loads(args.json.read_text())))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
