"""Throughput and tail latency of cvserve next to the in-process limit and two baselines, in one run.

On one model and one image mix it measures (a) the TorchScript model alone at the service's batch
sizes, and decode→model→postprocess in one process; (b) our gateway with the embedded backend and,
where tritonserver and the CPU repository exist, with the Triton backend; (c) a hand-written
FastAPI + torch server; (d) LitServe with batching. Every server is started here on a free
loopback port, loaded closed-loop at several concurrencies and open-loop (Poisson) at half its
saturation throughput, then stopped. Prints a table with ratios to (a) and (c); writes
bench.json and bench.png under --out.

    python -m loadtests.bench --model classifier --out loadtests/out
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loadtests import report
from loadtests.baselines.pipeline import ModelPipeline
from loadtests.images import DEFAULT_SIZES, EncodedImage, make_image_mix, parse_sizes
from loadtests.inprocess import measure_model, measure_pipeline
from loadtests.loadgen import LoadResult, RequestBuilder, closed_loop, open_loop
from loadtests.servers import ServerProcess, free_port, start_server
from service.handlers import HANDLERS
from service.settings import Settings

log = logging.getLogger("loadtests.bench")

SYSTEMS = ("embedded", "triton", "handwritten", "litserve")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="classifier", choices=["classifier", "detector", "segmenter"])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"servers to measure, from {','.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32", help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per load level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-requests", type=int, default=20_000, help="request cap per load level")
    parser.add_argument("--half-load-duration", type=float, default=20.0,
                        help="measured seconds of the open-loop run at half the saturation throughput (0 skips)")
    parser.add_argument("--raw-duration", type=float, default=5.0, help="seconds per in-process batch size")
    parser.add_argument("--images", type=int, default=16, help="distinct images in the mix")
    parser.add_argument("--image-sizes", default=",".join(f"{w}x{h}" for w, h in DEFAULT_SIZES),
                        help="comma-separated WIDTHxHEIGHT list")
    parser.add_argument("--triton-repository", type=Path, default=ROOT / "build" / "triton_cpu_repository",
                        help="repository tritonserver serves (the CPU python-backend variant here)")
    parser.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to get ready")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "out")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    if min(args.concurrency) < 1:
        parser.error("concurrency levels must be >= 1")
    return args


def multipart(images: list[EncodedImage]) -> RequestBuilder:
    """Request i uploads image i (cycling) as multipart field `file`, which every server reads."""

    def build(index: int) -> dict[str, Any]:
        image = images[index % len(images)]
        return {"files": {"file": (image.name, image.data, image.content_type)}}

    return build


def batch_sizes(settings: Settings, max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the batch size the service uses (settings, capped by the contract)."""
    limit = min(settings.max_batch_size, max_batch_size or settings.max_batch_size)
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, limit})


def server_env(settings: Settings, model: str, **overrides: str) -> dict[str, str]:
    """Environment of a server process: ours, the gateway's settings, this model only, overrides."""
    env = dict(os.environ)
    env.update({
        "CVSERVE_MODEL_REPOSITORY": str(settings.model_repository),
        "CVSERVE_MODELS": model,
        "CVSERVE_MAX_BATCH_SIZE": str(settings.max_batch_size),
        "CVSERVE_BATCH_WAIT_TIMEOUT_S": str(settings.batch_wait_timeout_s),
        "CVSERVE_TORCH_THREADS": str(settings.torch_threads),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT),
    })
    env.update(overrides)
    return env


@contextmanager
def running(name: str, command: list[str], port: int, ready_path: str, env: dict[str, str],
            args: argparse.Namespace) -> Iterator[ServerProcess]:
    """Start a server for the duration of a `with` block."""
    server = start_server(name, command, port, ready_path, args.out / "logs", env, args.start_timeout)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def start_system(system: str, settings: Settings, args: argparse.Namespace, endpoint: str) -> Iterator[str]:
    """Run one system; yield the URL to POST images to."""
    python = sys.executable
    port = free_port()
    if system == "handwritten":
        command = [python, "-m", "loadtests.baselines.handwritten", "--model", args.model, "--port", str(port)]
        with running(system, command, port, "/health", server_env(settings, args.model), args) as server:
            yield server.base_url + endpoint
    elif system == "litserve":
        command = [python, "-m", "loadtests.baselines.litserve_server", "--model", args.model, "--port", str(port)]
        with running(system, command, port, "/health", server_env(settings, args.model), args) as server:
            yield server.base_url + endpoint
    elif system == "embedded":
        with running_gateway(system, settings, args, port, backend="embedded") as server:
            yield server.base_url + endpoint
    else:
        with running_triton(settings, args) as grpc_url, running_gateway(
            system, settings, args, port, backend="triton", CVSERVE_TRITON_URL=grpc_url
        ) as server:
            yield server.base_url + endpoint


@contextmanager
def running_gateway(name: str, settings: Settings, args: argparse.Namespace, port: int, **env: str) -> Iterator[ServerProcess]:
    """`python -m service` in a fresh local Ray instance of its own (RAY_ADDRESS=local)."""
    overrides = {
        "CVSERVE_BACKEND": env.pop("backend"),
        "CVSERVE_PORT": str(port),
        "CVSERVE_HOST": "127.0.0.1",
        "CVSERVE_RAY_METRICS_PORT": str(free_port()),
        "RAY_ADDRESS": "local",  # never attach to another engineer's Ray, even if the shell names one
        **env,
    }
    with running(name, [sys.executable, "-m", "service"], port, "/ready", server_env(settings, args.model, **overrides), args) as server:
        yield server


@contextmanager
def running_triton(settings: Settings, args: argparse.Namespace) -> Iterator[str]:
    """tritonserver on the CPU repository (stack.triton's launcher); yield its gRPC address."""
    from stack.triton import start_tritonserver

    with tempfile.TemporaryDirectory(prefix="bench-triton-", dir=args.out) as work:
        triton = start_tritonserver(args.triton_repository, free_port(), free_port(), free_port(),
                                    work_dir=work, ready_timeout_s=args.start_timeout)
        try:
            yield triton.grpc_url
        finally:
            triton.stop()


def triton_missing(args: argparse.Namespace) -> str | None:
    """Why the Triton system cannot run here, or None if it can."""
    from stack.triton import tritonserver_binary

    if not tritonserver_binary().exists():
        return f"no tritonserver binary at {tritonserver_binary()}"
    if not (args.triton_repository / args.model / "config.pbtxt").is_file():
        return f"{args.triton_repository / args.model} missing: run `python -m export all` first"
    return None


async def load_levels(system: str, url: str, build: RequestBuilder, args: argparse.Namespace) -> list[LoadResult]:
    """Closed loop at every concurrency, then open loop at half the best throughput seen."""
    results = []
    for concurrency in args.concurrency:
        result = await closed_loop(system, url, build, concurrency, args.duration, args.warmup, args.max_requests)
        log.info("%-12s c=%-3d %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d", system, concurrency,
                 result.throughput_rps, result.p50_ms, result.p99_ms, result.errors)
        results.append(result)
    best = max(results, key=lambda r: r.throughput_rps)
    if args.half_load_duration > 0 and best.throughput_rps > 0:
        half = await open_loop(system, url, build, best.throughput_rps / 2, args.half_load_duration, args.warmup,
                               max_in_flight=4 * max(args.concurrency))
        log.info("%-12s open loop %.1f req/s offered: p50 %.1f ms  p99 %.1f ms  errors %d", system,
                 half.offered_rps, half.p50_ms, half.p99_ms, half.errors)
        results.append(half)
    return results


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    info = machine()
    started = time.time()

    images = make_image_mix(args.images, parse_sizes(args.image_sizes))
    pipeline = ModelPipeline.load(settings, args.model)
    prepared = [pipeline.prepare(image.data)[0] for image in images]
    sizes = batch_sizes(settings, pipeline.contract.max_batch_size)
    raw = measure_model(pipeline, prepared, sizes, args.raw_duration)
    raw.append(measure_pipeline(pipeline, images, sizes[-1], args.raw_duration))
    for r in raw:
        log.info("in-process %-8s batch %2d: %7.1f images/s", r.stage, r.batch_size, r.images_per_s)
    del pipeline  # free the model before the servers load theirs

    loads: list[LoadResult] = []
    skipped: dict[str, str] = {}
    build = multipart(images)
    for system in args.systems:
        reason = triton_missing(args) if system == "triton" else None
        if reason:
            skipped[system] = reason
            log.warning("skipping %s: %s", system, reason)
            continue
        try:
            with start_system(system, settings, args, HANDLERS[args.model].endpoint) as url:
                loads.extend(asyncio.run(load_levels(system, url, build, args)))
        except RuntimeError as error:  # a server that does not start is reported, the rest still run
            skipped[system] = str(error).splitlines()[0]
            log.error("%s failed: %s", system, error)

    info["loadavg_end"] = os.getloadavg()
    results = {
        "model": args.model,
        "note": args.note,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": info,
        "settings": {k: getattr(settings, k) for k in ("max_batch_size", "batch_wait_timeout_s", "torch_threads",
                                                        "model_num_cpus", "model_replicas", "ingress_replicas")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": [{"name": i.name, "bytes": len(i.data)} for i in images],
        "inprocess": [dataclasses.asdict(r) for r in raw],
        "loads": [dataclasses.asdict(r) for r in loads],
        "skipped": skipped,
    }
    results["summary"] = report.summarize(results)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    report.plot(results, args.out / "bench.png")
    print(report.table(results))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
