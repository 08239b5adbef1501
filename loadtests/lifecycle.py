"""What a shadow candidate costs the user: request latency with and without shadow comparisons.

The API in this process (`create_api` + `LocalBackend`, TorchScript, the classifier; no HTTP server in
between) over a repository holding the demo classifier as version 1 (current) and version 2 with two
classes swapped (`support.versions`). Each round runs every configuration for `--duration` seconds with
`--concurrency` one-image requests in flight, in a rotating order so that drift on a shared machine hits
them alike: no candidate (baseline), version 2 shadowing 10 % of the requests, and 100 %. Between
configurations the comparisons still running are awaited, so none spills into the next window.
A fourth configuration repeats the baseline (the control): its ratio is the noise of the measurement.
A ratio is a configuration's median (or p95) latency over the baseline's in the same round; the table
gives the median over rounds. Also: how many requests were compared, dropped (busy / queue), and the
mean top-1 agreement the comparisons found.

Two kinds of load: `--concurrency N` closed-loop clients (each sends its next request when the last one
is answered: a gateway that is never idle) or `--rate R` requests a second arriving at seeded random
(Poisson) times whatever the answers (open loop: the idle time a real gateway has between requests).
By default comparisons run only in the gateway's idle time (`shadow_max_utilisation` 0.5); with
`--max-utilisation 1` they run whatever the load, which is what they cost beside the users' requests.

Run: `python -m loadtests.lifecycle` (about 2 minutes on 2 cores); `--out FILE` writes the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from support.seeds import fresh_seeds
from support.versions import CLASSIFIER, one_version_repository, swap_classes, write_version
from training.shapes import make_scene

# The control is the baseline again: how far two identical configurations differ is the noise band.
CONFIGS: dict[str, float | None] = {
    "baseline: no candidate": None, "shadow 10 %": 0.1, "shadow 100 %": 1.0, "control: no candidate again": None,
}  # fmt: skip
BASELINE = next(iter(CONFIGS))


def images(count: int) -> list[bytes]:
    out = []
    for seed in fresh_seeds(count, offset=900):
        buffer = io.BytesIO()
        Image.fromarray(make_scene(seed, 96, 1, 1).image).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


async def window(client: httpx.AsyncClient, bodies: list[bytes], concurrency: int, seconds: float) -> list[float]:
    """Latencies of the requests `concurrency` closed-loop clients finish within `seconds`."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        index = offset
        while time.perf_counter() < end:
            began = time.perf_counter()
            response = await client.post(
                "/classify", content=bodies[index % len(bodies)], headers={"content-type": "image/png"}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - began)
            index += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies


async def arrivals(client: httpx.AsyncClient, bodies: list[bytes], rate: float, seconds: float, seed: int) -> list[float]:
    """Latencies of requests sent at Poisson times (`rate` a second, open loop) during `seconds`."""
    latencies: list[float] = []
    rng = random.Random(seed)

    async def one(body: bytes) -> None:
        began = time.perf_counter()
        response = await client.post("/classify", content=body, headers={"content-type": "image/png"})
        response.raise_for_status()
        latencies.append(time.perf_counter() - began)

    tasks = []
    start = time.perf_counter()
    due = start
    index = 0
    while (due := due + rng.expovariate(rate)) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(bodies[index % len(bodies)])))
        index += 1
    await asyncio.gather(*tasks)
    return latencies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="lifecycle-"))
    repository = one_version_repository(args.model_repository, work / "repository")
    write_version(
        repository, CLASSIFIER, "2", swap_classes(args.model_repository / CLASSIFIER / "1" / "model.pt", work / "v2.pt")
    )
    settings = Settings(
        model_repository=repository, models=(CLASSIFIER,), device="cpu", runtime=args.runtime, torch_threads=1,
        shadow_busy_requests=args.busy, shadow_max_pending=args.max_pending,
        **({} if args.max_utilisation is None else {"shadow_max_utilisation": args.max_utilisation}),
    )  # fmt: skip
    backend = LocalBackend(settings)
    # version 2 is the repository's latest: start on it, then make version 1 current and 2 the candidate
    api = create_api(settings, backend)
    lifecycle = api.state.answerer.lifecycle
    await lifecycle.load(CLASSIFIER, "1", who="loadtests.lifecycle")
    bodies = images(64)
    rounds: list[dict[str, Any]] = []
    counts: dict[str, dict[str, Any]] = {name: {"compared": 0, "dropped": {}, "agreement": []} for name in CONFIGS}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://lifecycle") as client:
        await window(client, bodies, args.concurrency, args.warmup)
        names = list(CONFIGS)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            figures: dict[str, dict[str, float]] = {}
            for name in order:
                share = CONFIGS[name]
                if share is None:
                    await lifecycle.clear_candidate(CLASSIFIER, who="loadtests.lifecycle")
                else:
                    await lifecycle.set_candidate(CLASSIFIER, "2", "shadow", share, who="loadtests.lifecycle")
                    lifecycle.tallies.pop(CLASSIFIER, None)
                    lifecycle._tally(CLASSIFIER, "2", "shadow")
                if args.rate:
                    seed = round_index  # the same arrival times for every configuration of a round
                    latencies = await arrivals(client, bodies, args.rate, args.duration, seed)
                else:
                    latencies = await window(client, bodies, args.concurrency, args.duration)
                await lifecycle.drain()
                tally = lifecycle.tallies.get(CLASSIFIER)
                if share is not None and tally is not None:
                    counts[name]["compared"] += tally.requests
                    for reason, dropped in tally.dropped.items():
                        counts[name]["dropped"][reason] = counts[name]["dropped"].get(reason, 0) + dropped
                    if tally.images:
                        counts[name]["agreement"].append(tally.sums["top1_agreement"] / tally.images)
                figures[name] = {
                    "requests": len(latencies),
                    "p50_ms": statistics.median(latencies) * 1000,
                    "p95_ms": p95(latencies) * 1000,
                    "per_s": len(latencies) / args.duration,
                }
            rounds.append(figures)
    await backend.close()
    api.state.answerer.close()
    summary = {}
    for name in CONFIGS:
        summary[name] = {
            "p50_ms": statistics.median(r[name]["p50_ms"] for r in rounds),
            "p95_ms": statistics.median(r[name]["p95_ms"] for r in rounds),
            "p50_ratio": statistics.median(r[name]["p50_ms"] / r[BASELINE]["p50_ms"] for r in rounds),
            "p95_ratio": statistics.median(r[name]["p95_ms"] / r[BASELINE]["p95_ms"] for r in rounds),
            "per_s_ratio": statistics.median(r[name]["per_s"] / r[BASELINE]["per_s"] for r in rounds),
            "compared_requests": counts[name]["compared"],
            "dropped": counts[name]["dropped"],
            "top1_agreement": statistics.mean(counts[name]["agreement"]) if counts[name]["agreement"] else None,
        }
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "shadow_max_utilisation": settings.shadow_max_utilisation,
        "rounds": rounds,
        "summary": summary,
    }


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    load = (
        f"open loop, {settings['rate']} requests/s at Poisson times"
        if settings.get("rate") not in (None, "None", "0.0")
        else f"concurrency {settings['concurrency']} (closed loop)"
    )
    lines = [
        f"{result['when']}, {result['machine']}; {settings['rounds']} rounds of "
        f"{settings['duration']} s per configuration, {load}, "
        f"shadow_busy_requests {settings['busy']}, shadow_max_pending {settings['max_pending']}, "
        f"shadow_max_utilisation {result.get('shadow_max_utilisation', 1.0)}.",
        "",
        "| configuration | p50 ms | p95 ms | p50 ratio | p95 ratio | req/s ratio | compared | dropped | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        agreement = f"{row['top1_agreement']:.3f}" if row["top1_agreement"] is not None else "-"
        lines.append(
            f"| {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p50_ratio']:.2f} | {row['p95_ratio']:.2f} "
            f"| {row['per_s_ratio']:.2f} | {row['compared_requests']} | {row['dropped'] or '-'} | {agreement} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.lifecycle", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--runtime", choices=("torchscript", "onnxruntime"), default="torchscript")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop clients (without --rate)")
    parser.add_argument("--rate", type=float, help="open loop: requests a second at Poisson times (instead of --concurrency)")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, help="CVSERVE_SHADOW_BUSY_REQUESTS (default: the gateway's, the cores)")
    parser.add_argument("--max-pending", type=int, default=4, help="CVSERVE_SHADOW_MAX_PENDING (default 4)")
    parser.add_argument(
        "--max-utilisation", type=float, help="CVSERVE_SHADOW_MAX_UTILISATION (default: the gateway's, 0.5; 1: always compare)"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    args.model_repository = args.model_repository.resolve()
    result = asyncio.run(measure(args))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
