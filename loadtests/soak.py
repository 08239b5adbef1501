"""Soak: a long Locust run at moderate load against a gateway started here; zero failures and flat memory.

Starts `python -m service` (embedded backend, its own local Ray) on free loopback ports, runs
loadtests/locustfile.py headless for `--warmup` + `--duration` seconds, and samples the resident
memory (RSS) of every Ray Serve replica process of that gateway with psutil. Passes when Locust
saw no failure, no replica process was replaced, and the replicas' summed RSS at the end of the run
is less than `--max-growth` above its level at the end of the warm-up. Not part of CI.

    python -m loadtests.soak --out loadtests/out/soak                 # 10 minutes + 1 minute warm-up
    python -m loadtests.soak --duration 60 --warmup 20 --users 2      # a quick look

Writes soak.json (settings, samples, verdict) and prints a Markdown summary for loadtests/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from support.ports import free_port, reserved_free_ports
from support.process import HttpServer, start_server

log = logging.getLogger("loadtests.soak")

# Ray titles a replica's worker process `ray::ServeReplica:<app>:<deployment>[.<method running>]`.
REPLICA_TITLE = re.compile(r"^ray::ServeReplica:([^\s:]+):([\w-]+)")


@dataclass(frozen=True)
class Sample:
    """RSS of each replica process of the gateway at one moment (seconds since the load started)."""

    at_s: float
    rss_by_pid: dict[int, int]
    title_by_pid: dict[int, str]

    @property
    def total(self) -> int:
        return sum(self.rss_by_pid.values())


@dataclass(frozen=True)
class Verdict:
    """The soak's figures and whether they pass."""

    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rss_start_mib: float
    rss_end_mib: float
    rss_max_mib: float
    growth: float
    replicas_replaced: bool
    passed: bool


def replica_processes(root_pid: int) -> dict[int, str]:
    """PID → process title of every Serve replica under `root_pid` (the gateway's own Ray only)."""
    found = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        match = REPLICA_TITLE.match(title)
        if match:
            found[child.pid] = f"{match[1]}/{match[2]}"
    return found


def sample(root_pid: int, started: float) -> Sample:
    """RSS of every replica process now."""
    titles = replica_processes(root_pid)
    rss = {}
    for pid in titles:
        try:
            rss[pid] = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return Sample(time.monotonic() - started, rss, {pid: titles[pid] for pid in rss})


def rss_growth(samples: list[Sample], warmup_s: float, window: int = 3) -> tuple[float, float, float]:
    """(start, end, growth): mean total RSS of the first `window` samples after the warm-up and of the
    last `window` samples, and the relative growth between them."""
    measured = [s for s in samples if s.at_s >= warmup_s]
    if len(measured) < 2 * window:
        raise ValueError(f"only {len(measured)} samples after the warm-up; need {2 * window}")
    start = sum(s.total for s in measured[:window]) / window
    end = sum(s.total for s in measured[-window:]) / window
    return start, end, (end - start) / start


def read_locust_totals(stats_csv: Path) -> dict[str, float]:
    """The Aggregated row of Locust's `<prefix>_stats.csv`: requests, failures, rps and percentiles."""
    with stats_csv.open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": float(total["Requests/s"]),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
    }


def judge(samples: list[Sample], totals: dict[str, float], warmup_s: float, max_growth: float) -> Verdict:
    """Pass iff no request failed, the replica processes stayed the same and RSS grew less than allowed."""
    start, end, growth = rss_growth(samples, warmup_s)
    pid_sets = {frozenset(s.rss_by_pid) for s in samples if s.rss_by_pid}
    replaced = len(pid_sets) > 1
    mib = 1024 * 1024
    return Verdict(
        requests=int(totals["requests"]),
        failures=int(totals["failures"]),
        rps=totals["rps"],
        p50_ms=totals["p50_ms"],
        p95_ms=totals["p95_ms"],
        p99_ms=totals["p99_ms"],
        rss_start_mib=start / mib,
        rss_end_mib=end / mib,
        rss_max_mib=max(s.total for s in samples) / mib,
        growth=growth,
        replicas_replaced=replaced,
        passed=totals["failures"] == 0 and totals["requests"] > 0 and not replaced and growth < max_growth,
    )


def run_locust(url: str, args: argparse.Namespace, prefix: Path) -> subprocess.Popen[bytes]:
    """Start headless Locust on loadtests/locustfile.py for warm-up + duration."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(Path(__file__).with_name("locustfile.py")),
        "--host",
        url,
        "--headless",
        "-u",
        str(args.users),
        "-r",
        str(args.users),
        "--run-time",
        f"{int(args.warmup + args.duration)}s",
        "--csv",
        str(prefix),
        "--only-summary",
        "--wait-min",
        str(args.wait_min),
        "--wait-max",
        str(args.wait_max),
    ]
    with prefix.with_suffix(".log").open("wb") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


def markdown(verdict: Verdict, args: argparse.Namespace, per_title: dict[str, tuple[float, float]]) -> str:
    """The RESULTS.md section body."""
    setup = (
        f"{args.duration / 60:.1f} min after a {args.warmup:g} s warm-up, {args.users} Locust users "
        f"(think time {args.wait_min:g}–{args.wait_max:g} s, classify:detect:segment 3:2:1), "
        f"embedded backend on {platform.node()} ({os.cpu_count()} cores)."
    )
    rss = f"{verdict.rss_start_mib:.0f} → {verdict.rss_end_mib:.0f} (max {verdict.rss_max_mib:.0f})"
    latency = f"{verdict.p50_ms:.0f} | {verdict.p95_ms:.0f} | {verdict.p99_ms:.0f}"
    verdict_word = "pass" if verdict.passed else "FAIL"
    lines = [
        setup,
        "",
        "| requests | failures | req/s | p50 ms | p95 ms | p99 ms | replica RSS start → end (MiB) | growth | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {verdict.requests} | {verdict.failures} | {verdict.rps:.1f} | {latency} | {rss} "
        + f"| {verdict.growth:+.1%} | {verdict_word} |",
        "",
        "| replica | RSS start → end (MiB) |",
        "|---|---|",
        *(f"| {title} | {a:.0f} → {b:.0f} |" for title, (a, b) in sorted(per_title.items())),
    ]
    return "\n".join(lines)


def per_replica(samples: list[Sample], warmup_s: float) -> dict[str, tuple[float, float]]:
    """RSS (MiB) of each replica title at the end of the warm-up and at the end."""
    measured = [s for s in samples if s.at_s >= warmup_s]
    first, last = measured[0], measured[-1]
    mib = 1024 * 1024
    by_title: dict[str, tuple[float, float]] = {}
    for pid, title in first.title_by_pid.items():
        end = next((last.rss_by_pid[p] for p, t in last.title_by_pid.items() if t == title), 0)
        by_title[title] = (first.rss_by_pid[pid] / mib, end / mib)
    return by_title


LATE_PORTS = (
    "CVSERVE_HAPROXY_STATS_PORT", "CVSERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)


def soak(args: argparse.Namespace) -> Verdict:
    """Start the gateway, load it, sample memory, stop everything; return the verdict."""
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "CVSERVE_PORT": str(port),
        "CVSERVE_RAY_METRICS_PORT": str(free_port()),
        # bound once Ray runs, so from the reserved range; the last is Ray's fallback proxy (default 8500)
        **dict(zip(LATE_PORTS, map(str, reserved_free_ports(len(LATE_PORTS))), strict=True)),
        "CVSERVE_BACKEND": "embedded",
        "CVSERVE_DEVICE": os.environ.get("CVSERVE_DEVICE", "cpu"),
    }
    if args.model_repository is not None:
        env["CVSERVE_MODEL_REPOSITORY"] = str(args.model_repository.resolve())
    server: HttpServer = start_server(
        "gateway", [sys.executable, "-m", "service"], port, "/ready", args.out, env=env, timeout_s=300
    )
    samples: list[Sample] = []
    try:
        locust = run_locust(server.url, args, args.out / "locust")
        started = time.monotonic()
        while locust.poll() is None:
            samples.append(sample(server.process.pid, started))
            log.info(
                "t=%4.0fs replica RSS %.0f MiB (%d processes)",
                samples[-1].at_s,
                samples[-1].total / 2**20,
                len(samples[-1].rss_by_pid),
            )
            time.sleep(args.sample_every)
        samples.append(sample(server.process.pid, started))
    finally:
        server.stop()
    totals = read_locust_totals(args.out / "locust_stats.csv")
    verdict = judge(samples, totals, args.warmup, args.max_growth)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "locust_exit_code": locust.returncode,
        "verdict": asdict(verdict),
        "samples": [asdict(s) for s in samples],
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    print(markdown(verdict, args, per_replica(samples, args.warmup)))  # the CLI's output: the RESULTS.md section
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the soak, exit 0 only if it passed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=600.0, help="measured seconds of load (default 600)"
    )
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before measuring (default 60)"
    )
    parser.add_argument(
        "--users", type=int, default=4, help="Locust users (default 4: moderate on a small CPU box)"
    )
    parser.add_argument("--wait-min", type=float, default=0.2, help="shortest think time, s")
    parser.add_argument("--wait-max", type=float, default=1.0, help="longest think time, s")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument(
        "--max-growth", type=float, default=0.10, help="allowed relative RSS growth (default 0.10)"
    )
    parser.add_argument(
        "--model-repository", type=Path, default=None, help="default: CVSERVE_MODEL_REPOSITORY"
    )
    parser.add_argument("--out", type=Path, default=Path("loadtests/out/soak"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return 0 if soak(args).passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
