"""What stage timings and tracing cost in throughput: one run, the same app with each switched on and off.

Four configurations of the API in this process (`create_api` + `LocalBackend`: the replica's path
from the ASGI call to the model and back, without an HTTP server in between): stage timings
(`CVSERVE_STAGE_TIMINGS`) off/on × tracing (`CVSERVE_TRACING`) off/on, tracing exporting to a real
OTLP/HTTP receiver in this process (`support.otlp`, so its decoding shares the cores too). Every
request carries a fresh `traceparent`, as a traced client's would. Each round runs every
configuration for `--duration` seconds with `--concurrency` requests in flight, in a rotating order,
so drift on a shared machine hits them alike; a ratio is a configuration's images/s over the
baseline's (both off) in the same round, and the table gives the median over rounds and their range.
Run: `python -m loadtests.observability_cost` (about 2.5 minutes on 2 cores). Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.otlp import OtlpReceiver

CONFIGS: dict[str, dict[str, bool]] = {
    "baseline: timings off, tracing off": {"stage_timings": False, "tracing": False},
    "timings on (the default)": {"stage_timings": True, "tracing": False},
    "tracing on, timings off": {"stage_timings": False, "tracing": True},
    "timings on, tracing on": {"stage_timings": True, "tracing": True},
}
BASELINE = next(iter(CONFIGS))
ENDPOINTS = {"classifier": "/classify", "detector": "/detect", "segmenter": "/segment"}


class CountingReceiver(OtlpReceiver):
    """The OTLP receiver, also summing the CPU time its threads spend on exports (its share of the cores)."""

    cpu_s = 0.0

    def _received(self, body: bytes, encoding: str, content_type: str) -> Any:
        began = time.thread_time()
        try:
            return super()._received(body, encoding, content_type)
        finally:
            self.cpu_s += time.thread_time() - began  # one exporter, one export at a time


@dataclass
class Measured:
    """Requests answered (one image each) and their latencies in one timed window."""

    seconds: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_s) / self.seconds


async def drive(app: Any, endpoint: str, images: list[Any], concurrency: int, duration_s: float) -> Measured:
    """Keep `concurrency` requests in flight against `app` for `duration_s`; every one must answer 200."""
    import httpx

    latencies: list[float] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as client:
        began = time.perf_counter()
        deadline = began + duration_s

        async def worker(first: int) -> None:
            index = first
            while time.perf_counter() < deadline:
                image = images[index % len(images)]
                index += concurrency
                headers = {
                    "Content-Type": image.content_type,
                    "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
                }
                sent = time.perf_counter()
                response = await client.post(endpoint, content=image.data, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"{endpoint} answered {response.status_code}: {response.text[:200]}")
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return Measured(time.perf_counter() - began, latencies)


async def run(args: argparse.Namespace) -> str:
    from loadtests.images import make_image_mix
    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings

    endpoint = ENDPOINTS[args.model]
    images = make_image_mix(16)
    receiver = CountingReceiver().start()
    apps = {}
    for name, switches in CONFIGS.items():
        settings = Settings(
            model_repository=args.repository.resolve(), models=(args.model,), device="cpu",
            otlp_endpoint=receiver.url, tracing_service_name="cvserve-cost", **switches,
        )  # fmt: skip
        apps[name] = create_api(settings, LocalBackend(settings))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    warm_up = {}
    for name, app in apps.items():  # warm: thread pools, batch shapes, the exporter's connection
        warm_up[name] = await drive(app, endpoint, images, args.concurrency, args.warmup)
    results: dict[str, list[Measured]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            results[name].append(await drive(apps[name], endpoint, images, args.concurrency, args.duration))
    load_after = os.getloadavg()[0]
    traced_requests = sum(
        len(m.latencies_s)
        for name, runs in results.items()
        if CONFIGS[name]["tracing"]
        for m in [*runs, warm_up[name]]
    )
    for app in apps.values():
        app.state.answerer.close()  # a traced app flushes its last spans here
    spans = len(receiver.spans())
    receiver.stop()
    traced_s = sum(m.seconds for name, runs in results.items() if CONFIGS[name]["tracing"] for m in runs)
    traced_s += sum(warm_up[name].seconds for name in CONFIGS if CONFIGS[name]["tracing"])
    receiver_share = receiver.cpu_s / traced_s
    return report(args, results, started, (load_before, load_after), traced_requests, spans, receiver_share)


def report(
    args: argparse.Namespace,
    results: dict[str, list[Measured]],
    started: str,
    load: tuple[float, float],
    traced_requests: int,
    spans: int,
    receiver_share: float,
) -> str:
    """The Markdown section for loadtests/RESULTS.md."""
    intro = (
        f"`python -m loadtests.observability_cost --model {args.model} --rounds {args.rounds} --duration "
        f"{args.duration:g} --concurrency {args.concurrency}`, started {started}: {platform.machine()}, "
        f"{os.cpu_count()} shared CPU cores, no GPU, Python {platform.python_version()}, load average "
        f"{load[0]:.1f} before and {load[1]:.1f} after. The {args.model} API in one process "
        f"(`create_api` + `LocalBackend`, no HTTP server), {args.concurrency} requests of one image in flight "
        "(the bench's mix of JPEG/PNG scenes, 128² to 640×480), each with a fresh `traceparent`; tracing exports "
        "through the SDK's BatchSpanProcessor to an OTLP/HTTP receiver in the same process. Each round runs the "
        "four configurations in turn (rotating order); ratio = images/s over the baseline's in the same round."
    )
    lines = [
        f"## What stage timings and tracing cost (issue 15.2, {started[:10]})",
        "",
        intro,
        "",
        "| configuration | images/s (median) | p50 ms | ratio to baseline (median) | ratio range over rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    baseline = results[BASELINE]
    for name, runs in results.items():
        ratios = [run.images_per_s / base.images_per_s for run, base in zip(runs, baseline, strict=True)]
        p50_ms = 1000 * statistics.median(latency for run in runs for latency in run.latencies_s)
        lines.append(
            f"| {name} | {statistics.median(r.images_per_s for r in runs):.1f} | {p50_ms:.1f} "
            f"| {statistics.median(ratios):.3f} | {min(ratios):.3f}–{max(ratios):.3f} |"
        )
    per_request = spans / max(traced_requests, 1)
    receiver_note = (
        f"Decoding them took the receiver {100 * receiver_share:.1f} % of one core while the traced configurations "
        "ran (a real collector elsewhere would not put that on the gateway's cores)."
    )
    lines += [
        "",
        f"Spans received: {spans} for {traced_requests} traced requests ({per_request:.2f} per request; 8 expected).",
        receiver_note,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", choices=sorted(ENDPOINTS), default="classifier")
    parser.add_argument("--rounds", type=int, default=5, help="times every configuration is measured")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per configuration per round")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds per configuration before the rounds"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
