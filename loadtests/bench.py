"""Throughput and tail latency of cvserve next to the in-process limit and two baselines, in one run.

For each model, on one image mix, it measures (a) the model alone (in the runtime `embedded`
runs it: CVSERVE_RUNTIME, auto by default) at the service's batch sizes, and decode→model→postprocess in one process; (b) our gateway with the embedded
backend and, where tritonserver and the CPU repository exist, with the Triton backend, each behind
Serve's Python proxy and behind HAProxy (`embedded-haproxy`, `triton-haproxy`), and with either
runtime forced (`embedded-torchscript`, `embedded-onnxruntime`); (c) a hand-written FastAPI +
torch server; (d) LitServe with batching over TorchScript, and over ONNX Runtime
(`litserve-onnxruntime`). Every server is started here on
a free loopback port, loaded closed-loop at several concurrencies and open-loop (Poisson) at half
its saturation throughput, then stopped. Prints a table per model with ratios to (a) and (c);
writes bench.json, bench.md (Markdown tables) and bench.png under --out. The gateway's settings
(batch size, wait, threads) come from CVSERVE_* as usual and apply to every server.

    python -m loadtests.bench --out loadtests/out            # all models and systems, ~30 min on 2 cores
    python -m loadtests.bench --models detector --concurrency 1,8 --duration 5   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tasks
from loadtests import report
from loadtests.baselines.pipeline import ModelPipeline
from loadtests.images import DEFAULT_SIZES, EncodedImage, make_image_mix, parse_sizes
from loadtests.inprocess import RawResult, measure_model, measure_pipeline
from loadtests.loadgen import LoadResult, RequestBuilder, closed_loop, open_loop
from service.backends.runtimes import runtime_of
from service.settings import Settings
from support.ports import free_port, free_ports, reserved_free_ports
from support.process import HttpServer, start_server

log = logging.getLogger("loadtests.bench")

# Ours: "<backend>" is the configuration `make serve` starts (for Triton: the same with
# CVSERVE_BACKEND=triton); a suffix changes one thing: "-proxy" / "-haproxy" the HTTP ingress,
# "-deployments" puts each embedded model in a Serve deployment of its own (the design before the
# models moved into the gateway replica), "-torchscript" / "-onnxruntime" the runtime of every model
# (the default is CVSERVE_RUNTIME=auto: per model, the one measured faster).
VARIANTS: dict[str, dict[str, str]] = {
    "embedded": {"CVSERVE_BACKEND": "embedded"},
    "embedded-proxy": {"CVSERVE_BACKEND": "embedded", "CVSERVE_INGRESS": "proxy"},
    "embedded-haproxy": {"CVSERVE_BACKEND": "embedded", "CVSERVE_INGRESS": "haproxy"},
    "embedded-deployments": {
        "CVSERVE_BACKEND": "embedded", "CVSERVE_INGRESS": "proxy", "CVSERVE_MODEL_PLACEMENT": "deployment",
    },
    "embedded-torchscript": {"CVSERVE_BACKEND": "embedded", "CVSERVE_RUNTIME": "torchscript"},
    "embedded-onnxruntime": {"CVSERVE_BACKEND": "embedded", "CVSERVE_RUNTIME": "onnxruntime"},
    "triton": {"CVSERVE_BACKEND": "triton"},
    "triton-proxy": {"CVSERVE_BACKEND": "triton", "CVSERVE_INGRESS": "proxy"},
    "triton-haproxy": {"CVSERVE_BACKEND": "triton", "CVSERVE_INGRESS": "haproxy"},
}
# The runtime each baseline runs: the hand-written server and LitServe keep TorchScript (the peers the
# targets are measured against); litserve-onnxruntime is LitServe's figure over the same model.onnx.
BASELINES: dict[str, str] = {
    "handwritten": "torchscript",
    "litserve": "torchscript",
    "litserve-onnxruntime": "onnxruntime",
}
SYSTEMS = (*VARIANTS, *BASELINES)
DEFAULT_SYSTEMS = (
    "embedded", "embedded-onnxruntime", "embedded-deployments", "triton", "handwritten", "litserve",
    "litserve-onnxruntime",
)  # fmt: skip
MODELS = tasks.MODELS
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help); lists arrive as comma-separated text."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"models to measure, from {','.join(MODELS)}"
    )
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"servers to measure, from {','.join(SYSTEMS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one load level per system (closed loop at --quick-concurrency, no open loop), short "
        "durations: every system and model side by side in a few minutes",
    )
    parser.add_argument("--quick-concurrency", type=int, default=16, help="the one closed-loop level of --quick")
    parser.add_argument("--concurrency", default="1,4,8,16,32", help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per load level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-requests", type=int, default=20_000, help="request cap per load level")
    parser.add_argument(
        "--half-load-duration",
        type=float,
        default=15.0,
        help="measured seconds of the open-loop run at half the saturation throughput (0 skips)",
    )
    parser.add_argument("--raw-duration", type=float, default=5.0, help="seconds per in-process batch size")
    parser.add_argument("--images", type=int, default=16, help="distinct images in the mix")
    parser.add_argument(
        "--image-sizes",
        default=",".join(f"{w}x{h}" for w, h in DEFAULT_SIZES),
        help="comma-separated WIDTHxHEIGHT list",
    )
    parser.add_argument(
        "--triton-repository",
        type=Path,
        default=ROOT / "build" / "triton_cpu_repository",
        help="repository tritonserver serves (the CPU python-backend variant here)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=240.0, help="seconds a server may take to get ready"
    )
    parser.add_argument(
        "--note", default="", help="free text stored with the results (e.g. 'machine shared')"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "out")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # servers (tritonserver's backend directory) run from other directories
    if args.quick:
        args.concurrency = str(args.quick_concurrency)
        args.duration, args.warmup, args.half_load_duration, args.raw_duration = 5.0, 2.0, 0.0, 1.5
    args.models = _choices(parser, "--models", args.models, MODELS)
    args.systems = _choices(parser, "--systems", args.systems, SYSTEMS)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    except ValueError:
        parser.error("--concurrency takes comma-separated integers, e.g. 1,4,16")
    if min(args.concurrency) < 1:
        parser.error("concurrency levels must be >= 1")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{flag}: unknown or empty {unknown}; choose from {','.join(allowed)}")
    return chosen


def multipart(images: list[EncodedImage]) -> RequestBuilder:
    """Request i uploads image i (cycling) as multipart field `file`, which every server reads."""

    def build(index: int) -> dict[str, Any]:
        image = images[index % len(images)]
        return {"files": {"file": (image.name, image.data, image.content_type)}}

    return build


def batch_sizes(settings: Settings, contract_max: int) -> list[int]:
    """1, 2, 4, ... up to the batch size the service uses (settings, capped by the contract)."""
    limit = min(settings.max_batch_size, contract_max or settings.max_batch_size)
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, limit})


def server_env(settings: Settings, model: str, **overrides: str) -> dict[str, str]:
    """Environment of a server process: ours, the gateway's settings, this model only, overrides."""
    env = dict(os.environ)
    env.update(
        {
            "CVSERVE_MODEL_REPOSITORY": str(settings.model_repository),
            "CVSERVE_MODELS": model,
            "CVSERVE_MAX_BATCH_SIZE": str(settings.max_batch_size),
            "CVSERVE_BATCH_WAIT_TIMEOUT_S": str(settings.batch_wait_timeout_s),
            "CVSERVE_TORCH_THREADS": str(settings.torch_threads),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT),
        }
    )
    env.update(overrides)
    return env


@dataclass
class Run:
    """What every server of one bench run shares."""

    settings: Settings
    args: argparse.Namespace

    @contextmanager
    def server(
        self, name: str, command: list[str], port: int, ready_path: str, env: dict[str, str]
    ) -> Iterator[HttpServer]:
        """A server process for the duration of a `with` block."""
        server = start_server(
            name, command, port, ready_path, self.args.out / "logs", env, self.args.start_timeout
        )
        try:
            yield server
        finally:
            server.stop()

    @contextmanager
    def baseline(self, system: str, model: str) -> Iterator[str]:
        """Run a one-model baseline server; yield its base URL."""
        port = free_port()
        module = "loadtests.baselines.handwritten" if system == "handwritten" else "loadtests.baselines.litserve_server"
        command = [sys.executable, "-m", module, "--model", model, "--port", str(port)]
        env = server_env(self.settings, model, CVSERVE_RUNTIME=BASELINES[system])
        with self.server(f"{model}-{system}", command, port, "/health", env) as server:
            yield server.url

    @contextmanager
    def ours(self, system: str, models: list[str]) -> Iterator[str]:
        """Run our gateway as `system` configures it, serving every model of the run; yield its base URL."""
        port = free_port()
        env = dict(VARIANTS[system])
        if env.get("CVSERVE_INGRESS", Settings.model_fields["ingress"].default) == "haproxy":
            stats, metrics, fallback = reserved_free_ports(3)
            env |= {
                "CVSERVE_HAPROXY_STATS_PORT": str(stats),
                "CVSERVE_HAPROXY_METRICS_PORT": str(metrics),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),  # Ray's default: 8500
            }
        with contextlib.ExitStack() as stack:
            if env["CVSERVE_BACKEND"] == "triton":
                env["CVSERVE_TRITON_URL"] = stack.enter_context(self.triton())
            server = stack.enter_context(self.gateway(system, ",".join(models), port, **env))
            yield server.url

    @contextmanager
    def gateway(self, name: str, models: str, port: int, **env: str) -> Iterator[HttpServer]:
        """`python -m service` in a fresh local Ray instance of its own."""
        overrides = {
            "CVSERVE_PORT": str(port),
            "CVSERVE_HOST": "127.0.0.1",
            "CVSERVE_RAY_METRICS_PORT": str(free_port()),
            "RAY_ADDRESS": "local",  # never attach to another engineer's Ray, even if the shell names one
            **env,
        }
        command = [sys.executable, "-m", "service"]
        with self.server(
            name, command, port, "/ready", server_env(self.settings, models, **overrides)
        ) as server:
            yield server

    @contextmanager
    def triton(self) -> Iterator[str]:
        """tritonserver on the CPU repository (stack.triton's launcher); yield its gRPC address."""
        from stack.triton import start_tritonserver

        with tempfile.TemporaryDirectory(prefix="bench-triton-", dir=self.args.out) as work:
            triton = start_tritonserver(
                self.args.triton_repository,
                *free_ports(3),
                work_dir=work,
                ready_timeout_s=self.args.start_timeout,
            )
            try:
                yield triton.grpc_url
            finally:
                triton.stop()

    def triton_missing(self, models: list[str]) -> str | None:
        """Why the Triton systems cannot run here, or None if they can."""
        from stack.triton import tritonserver_binary

        if not tritonserver_binary().exists():
            return f"no tritonserver binary at {tritonserver_binary()}"
        for model in models:
            if not (self.args.triton_repository / model / "config.pbtxt").is_file():
                return f"{self.args.triton_repository / model} missing: run `python -m export all` first"
        return None

    async def load_levels(self, system: str, url: str, build: RequestBuilder) -> list[LoadResult]:
        """Closed loop at every concurrency, then open loop at half the best throughput seen."""
        args = self.args
        results = []
        for concurrency in args.concurrency:
            result = await closed_loop(
                system, url, build, concurrency, args.duration, args.warmup, args.max_requests
            )
            log.info(
                "%-12s c=%-3d %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d",
                system,
                concurrency,
                result.throughput_rps,
                result.p50_ms,
                result.p99_ms,
                result.errors,
            )
            results.append(result)
        best = max(results, key=lambda r: r.throughput_rps)
        if args.half_load_duration > 0 and best.throughput_rps > 0:
            half = await open_loop(
                system,
                url,
                build,
                best.throughput_rps / 2,
                args.half_load_duration,
                args.warmup,
                max_in_flight=4 * max(args.concurrency),
            )
            log.info(
                "%-12s open loop %.1f req/s offered: p50 %.1f ms  p99 %.1f ms  errors %d",
                system,
                half.offered_rps,
                half.p50_ms,
                half.p99_ms,
                half.errors,
            )
            results.append(half)
        return results

    def inprocess(
        self, pipeline: ModelPipeline, images: list[EncodedImage], prepared: list[Any]
    ) -> list[RawResult]:
        """(a): the model alone (on `prepared` inputs) at each batch size, and decode+model+post at each."""
        sizes = batch_sizes(self.settings, pipeline.contract.max_batch_size)
        raw = measure_model(pipeline, prepared, sizes, self.args.raw_duration)
        raw += [measure_pipeline(pipeline, images, size, self.args.raw_duration) for size in sizes]
        for r in raw:
            log.info(
                "%s in-process %-8s batch %2d: %7.1f images/s", pipeline.endpoint, r.stage, r.batch_size, r.images_per_s
            )
        return raw

    def measure(self, images: list[EncodedImage]) -> list[dict[str, Any]]:
        """(a) in process for every model, then every system under load (ours serve all models at once)."""
        models = self.args.models
        pipelines = {model: ModelPipeline.load(self.settings, model) for model in models}
        # Model inputs of the image mix, prepared once: (a) now, and (a) again at the end.
        prepared = {model: [pipelines[model].prepare(image.data)[0] for image in images] for model in models}
        raw = {model: self.inprocess(pipelines[model], images, prepared[model]) for model in models}
        loads: dict[str, list[LoadResult]] = {model: [] for model in models}
        skipped: dict[str, str] = {}
        failed: dict[str, dict[str, str]] = {model: {} for model in models}
        build = multipart(images)
        for system in self.args.systems:
            if system in BASELINES:
                for model in models:
                    try:
                        with self.baseline(system, model) as url:
                            loads[model] += asyncio.run(self.load_levels(system, url + pipelines[model].endpoint, build))
                    except (RuntimeError, TimeoutError) as error:  # a server that does not start is reported; the others still run
                        failed[model][system] = str(error).splitlines()[0]
                        log.error("%s %s failed: %s", model, system, error)
                continue
            reason = self.triton_missing(models) if system.startswith("triton") else None
            if reason:
                skipped[system] = reason
                log.warning("skipping %s: %s", system, reason)
                continue
            try:
                with self.ours(system, models) as url:
                    for model in models:
                        loads[model] += asyncio.run(self.load_levels(system, url + pipelines[model].endpoint, build))
            except (RuntimeError, TimeoutError) as error:
                for model in models:
                    failed[model][system] = str(error).splitlines()[0]
                log.error("%s failed: %s", system, error)
        results = []
        for model in models:
            # The same (a) figure again: if the machine's load changed during the run, this shows it.
            sizes = batch_sizes(self.settings, pipelines[model].contract.max_batch_size)
            (again,) = measure_model(pipelines[model], prepared[model], sizes[-1:], self.args.raw_duration)
            log.info("%s in-process model batch %2d again: %7.1f images/s", model, again.batch_size, again.images_per_s)
            result = {
                "model": model,
                "runtime": runtime_of(pipelines[model].model),  # (a)'s: the one `embedded` runs
                "inprocess": [dataclasses.asdict(r) for r in raw[model]],
                "inprocess_again": dataclasses.asdict(again),
                "loads": [dataclasses.asdict(r) for r in loads[model]],
                "skipped": skipped,
                "failed": failed[model],
            }
            result["summary"] = report.summarize(result)
            results.append(result)
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
        # Inherited by every server: with the default (spinning) wait policy, two OpenMP threads on
        # two busy cores can run 5-20x slower; record what this run had.
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def main(argv: list[str] | None = None) -> int:
    """Measure, then print the tables and write bench.json and bench.png."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    info = machine()
    started = time.time()
    images = make_image_mix(args.images, parse_sizes(args.image_sizes))
    run = Run(settings, args)
    per_model = run.measure(images)
    info["loadavg_end"] = os.getloadavg()
    results = {
        "note": args.note,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": info,
        "settings": {
            k: getattr(settings, k)
            for k in (
                "max_batch_size",
                "batch_wait_timeout_s",
                "torch_threads",
                "model_num_cpus",
                "model_replicas",
                "ingress_replicas",
                "ingress",
                "model_placement",
                "runtime",
            )
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": [{"name": i.name, "bytes": len(i.data)} for i in images],
        "models": per_model,
    }
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    report.plot(results, args.out / "bench.png")
    (args.out / "bench.md").write_text(report.markdown(results))
    print(report.header(results))
    for model_result in per_model:
        print()
        print(report.table(model_result))
    print(f"\nwrote bench.json, bench.md and bench.png under {args.out}")
    return 1 if any(m["failed"] for m in per_model) else 0


if __name__ == "__main__":
    sys.exit(main())
