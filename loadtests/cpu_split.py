"""Where a request's CPU time goes: CPU milliseconds per answered request, per process of a server under load.

Starts each system as the benchmark does (`loadtests.bench`), loads it closed-loop, and reads the
CPU time (user + system, psutil) of every process in its tree and of the load generator before and
after the measured window. On a machine with few cores, CPU per request *is* the throughput
limit: the table shows which hop costs what.

    python -m loadtests.cpu_split --model classifier --systems embedded,embedded-deployments,litserve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path

import psutil

from loadtests import bench
from loadtests.images import DEFAULT_SIZES, make_image_mix
from loadtests.loadgen import closed_loop

log = logging.getLogger("loadtests.cpu_split")


def process_label(process: psutil.Process) -> str:
    """A stable name for a process: Ray's title (`ray::ServeReplica:app:Gateway`), else its program."""
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0].split(".")[0]
    if "-m" in cmdline:
        return f"python -m {cmdline[cmdline.index('-m') + 1]}"
    return os.path.basename(cmdline[0]) if cmdline else process.name()


def cpu_by_label(root_pid: int) -> dict[str, float]:
    """CPU seconds used so far by every process under `root_pid` (and it), summed per label."""
    totals: dict[str, float] = defaultdict(float)
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for process in processes:
        try:
            times = process.cpu_times()
            totals[process_label(process)] += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return dict(totals)


def split(run: bench.Run, system: str, model: str, concurrency: int, duration_s: float) -> dict[str, object]:
    """Load one system and return its CPU ms per request per process label."""
    images = make_image_mix(16, DEFAULT_SIZES)
    build = bench.multipart(images)
    endpoint = bench.ModelPipeline.load(run.settings, model).endpoint
    context: AbstractContextManager[str] = (
        run.baseline(system, model) if system in bench.BASELINES else run.ours(system, [model])
    )
    with context as base_url:
        url = base_url + endpoint
        server_pids = [p.pid for p in psutil.Process().children() if p.is_running()]
        asyncio.run(closed_loop(system, url, build, concurrency, 2.0, 0.0, 10_000))  # warm up
        me = psutil.Process()
        before = {pid: cpu_by_label(pid) for pid in server_pids}
        mine = me.cpu_times()
        result = asyncio.run(closed_loop(system, url, build, concurrency, duration_s, 0.0, 100_000))
        mine_after = me.cpu_times()
        after = {pid: cpu_by_label(pid) for pid in server_pids}
    per_label: dict[str, float] = defaultdict(float)
    for pid in server_pids:
        for label, seconds in after.get(pid, {}).items():
            per_label[label] += seconds - before.get(pid, {}).get(label, 0.0)
    per_label["load generator (this process)"] = (mine_after.user + mine_after.system) - (mine.user + mine.system)
    ms = {label: 1000 * seconds / max(result.ok, 1) for label, seconds in per_label.items() if seconds > 0.005}
    return {
        "system": system,
        "model": model,
        "requests": result.ok,
        "errors": result.errors,
        "throughput_rps": result.throughput_rps,
        "cpu_ms_per_request": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
        "server_cpu_ms_per_request": sum(v for k, v in ms.items() if not k.startswith("load generator")),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure each system in turn and print (and write as JSON) its CPU split."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="classifier", choices=bench.MODELS)
    parser.add_argument("--systems", default="embedded,embedded-deployments,litserve")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "loadtests" / "out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run = bench.Run(bench.Settings(), bench.parse_args(["--out", str(args.out)]))
    results = []
    for system in args.systems.split(","):
        entry = split(run, system.strip(), args.model, args.concurrency, args.duration)
        results.append(entry)
        print(f"\n{system}: {entry['throughput_rps']:.1f} req/s, server CPU {entry['server_cpu_ms_per_request']:.2f} ms/req")
        for label, ms in entry["cpu_ms_per_request"].items():  # type: ignore[union-attr]
            print(f"    {ms:7.2f} ms  {label}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cpu_split-{args.model}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
