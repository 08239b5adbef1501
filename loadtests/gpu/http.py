"""The GPU check's HTTP step: the Ray-free app end to end on one box.

One model owner on the device (`python -m service.owner_app --socket`, the models the model steps
exported, fp16 where they were), `servers` uvicorn worker processes of `service.owner_app` in front
of it (`python -m service.http_workers`: a listening socket each, so the clients' connections spread),
and a load generator of `client_processes` processes, `concurrency` clients in all, each sending its next
request (one JPEG, multipart) as soon as the last is answered, for `duration_s` per
model. Everything runs in this step's process group, so the orchestrator's time limit stops it all.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

ENDPOINTS = {"classifier": "/classify", "detector": "/detect", "segmenter": "/segment"}
START_TIMEOUT_S = 90.0
STEP_TIMEOUT_VARIABLE = "CVSERVE_CHECK_STEP_TIMEOUT_S"  # the orchestrator's time limit for the running step
WORKERS_START_S = 20.0  # the uvicorn workers' start, allowed for when the owner's time is set


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    from training.shapes import make_scene

    scene = make_scene(seed, max(width, height), 2, 6).image[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart_request(url: str, image: bytes, boundary: str = "cvserve-load-boundary") -> bytes:
    """The whole HTTP/1.1 request (keep-alive) that posts `image` to `url` as the multipart field `file`,
    as a client's `files={"file": ("image.jpg", image, "image/jpeg")}` sends it."""
    parts = urlsplit(url)
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one prepared request on a kept-alive connection; (status, body) of the answer (Content-Length
    bodies only, as uvicorn sends them)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise ConnectionError("a chunked answer: this client reads Content-Length bodies only")
    return status, await reader.readexactly(length)


def _client_process(
    url: str, clients: int, duration_s: float, warmup_s: float, image_size: list[int], seed: int, queue: Any
) -> None:
    """One load-generator process: `clients` closed-loop clients; puts (latencies, errors, samples).

    Each client keeps one connection and writes prepared request bytes (`multipart_request`): an
    HTTP library's per-request work (httpx: about 1 ms of CPU here) would take the cores the servers
    under test need when both run on one box."""
    requests = [multipart_request(url, _jpeg(*image_size, seed * 100 + i)) for i in range(4)]
    parts = urlsplit(url)

    async def run() -> tuple[list[float], int, list[str]]:
        latencies: list[float] = []
        errors, samples = 0, []
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + duration_s)

        async def worker(index: int) -> None:
            nonlocal errors
            count = 0
            connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            while time.perf_counter() < window[1]:
                began = time.perf_counter()
                count += 1
                try:
                    if connection is None:
                        connection = await asyncio.open_connection(parts.hostname, parts.port)
                    status, body = await asyncio.wait_for(
                        exchange(*connection, requests[(index + count) % len(requests)]), 30.0
                    )
                    error = None if status == 200 else f"HTTP {status}: {body[:120].decode(errors='replace')}"
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                        ValueError) as exc:  # fmt: skip
                    error = f"{type(exc).__name__}: {exc}"[:160]
                    if connection is not None:
                        connection[1].close()
                    connection = None
                finished = time.perf_counter()
                if window[0] <= finished <= window[1]:
                    if error is None:
                        latencies.append(finished - began)
                    else:
                        errors += 1
                        if len(samples) < 3:
                            samples.append(error)
            if connection is not None:
                connection[1].close()

        await asyncio.gather(*(worker(i) for i in range(clients)))
        return latencies, errors, samples

    queue.put(asyncio.run(run()))


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by processes `pids` and everything under them."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return total


class Usage(threading.Thread):
    """What each role's processes (process trees, by pid) used between `begin` and `end` (monotonic
    seconds): CPU cores busy, and the GPU's utilization (NVML's percent of time a kernel ran, sampled;
    None without NVML or a GPU). Read `result` after `join`."""

    def __init__(self, roles: dict[str, list[int]], begin: float, end: float, gpu_index: int | None) -> None:
        super().__init__(daemon=True, name="usage")
        self.roles, self.begin, self.end, self.gpu_index = roles, begin, end, gpu_index
        self.result: dict[str, Any] = {}
        self.cores: dict[str, float] = {}  # unrounded, for the per-request figures

    def run(self) -> None:
        time.sleep(max(0.0, self.begin - time.monotonic()))
        first, started = {role: tree_cpu_s(pids) for role, pids in self.roles.items()}, time.monotonic()
        utilization = _gpu_sampler(self.gpu_index)
        samples: list[float] = []
        while time.monotonic() < self.end:
            if utilization is not None:
                samples.append(utilization())
            time.sleep(0.2)
        last, ended = {role: tree_cpu_s(pids) for role, pids in self.roles.items()}, time.monotonic()
        self.window_s = max(ended - started, 1e-6)
        self.cores = {role: (last[role] - first[role]) / self.window_s for role in self.roles}
        self.result = {
            "window_s": round(self.window_s, 2),
            "cpu_cores": {role: round(cores, 3) for role, cores in self.cores.items()},
            "gpu_utilization_pct": round(sum(samples) / len(samples), 1) if samples else None,
        }


def _gpu_sampler(index: int | None) -> Any:
    """A function returning GPU `index`'s utilization percent now (NVML, nvidia-ml-py), or None."""
    if index is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
    except Exception:  # noqa: BLE001 - no NVML here: the figure is left out, the load is measured anyway
        return None
    return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def load(
    url: str, processes: int, concurrency: int, duration_s: float, warmup_s: float, image_size: list[int],
    observe: dict[str, list[int]] | None = None, gpu_index: int | None = None,
) -> dict[str, Any]:
    """Closed-loop load from `processes` processes; throughput and latency percentiles over all of them.
    With `observe` (role → pids), also each role's CPU cores busy and CPU ms per answered request, the
    load generator's among them, over the middle of the measured window (`Usage`), and with `gpu_index`
    the GPU's utilization there."""
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    queue = context.Queue()
    per_process = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    workers = [
        context.Process(target=_client_process, args=(url, n, duration_s, warmup_s, image_size, i, queue), daemon=True)
        for i, n in enumerate(per_process) if n
    ]  # fmt: skip
    for worker in workers:
        worker.start()
    usage = None
    if observe is not None:
        # Each client's window opens `warmup_s` after its process starts (spawn takes about a second).
        begin, end = started + warmup_s + 1.5, started + warmup_s + duration_s - 0.5
        if end - begin < 1.0:
            begin, end = started + warmup_s, started + warmup_s + duration_s
        roles = {**observe, "load_generator": [w.pid for w in workers if w.pid is not None]}
        usage = Usage(roles, begin, end, gpu_index)
        usage.start()
    latencies: list[float] = []
    errors, samples = 0, []
    for _ in workers:
        got, failed, some = queue.get(timeout=duration_s + warmup_s + 120)
        latencies += got
        errors += failed
        samples += some
    for worker in workers:
        worker.join(timeout=10)
    ms = np.asarray(latencies) * 1000
    p50, p99 = (round(float(p), 1) for p in np.percentile(ms, [50, 99])) if len(ms) else (None, None)
    throughput = len(latencies) / duration_s
    observed: dict[str, Any] = {}
    if usage is not None:
        usage.join(timeout=30)
        observed = dict(usage.result)
        if observed and throughput:
            observed["cpu_ms_per_request"] = {
                role: round(1000 * cores / throughput, 3) for role, cores in usage.cores.items()
            }
    return {
        "clients": concurrency,
        "client_processes": len(workers),
        "ok": len(latencies),
        "errors": errors,
        "error_samples": samples[:5],
        "throughput_rps": round(throughput, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        **({"usage": observed} if observe is not None else {}),
    }


def warm(url: str, requests: int, image_size: list[int]) -> float:
    """Send `requests` requests at once, twice, and wait for the answers: every worker's first request
    and the model's first batches are paid before the measured window. Returns the seconds it took."""
    import httpx

    image = _jpeg(*image_size, 0)
    started = time.monotonic()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120.0) as client:
            for _ in range(2):
                answers = await asyncio.gather(
                    *(
                        client.post(url, files={"file": ("image.jpg", image, "image/jpeg")})
                        for _ in range(requests)
                    )
                )
                bad = [a.status_code for a in answers if a.status_code != 200]
                if bad:
                    raise RuntimeError(
                        f"warm-up requests to {url} answered {bad[:3]}: {answers[0].text[:200]}"
                    )

    asyncio.run(run())
    return round(time.monotonic() - started, 1)


def _wait_for(
    check: Any, process: subprocess.Popen[bytes], what: str, timeout_s: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready (see its log)")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f}s (see its log)")


def owner_start_timeout(config: dict[str, Any]) -> float:
    """Seconds the owner may take to load and warm its models: what the step's time limit leaves after the
    workers' start and the first model's warm-up and load (its /classify figure is the run's headline), and
    never under START_TIMEOUT_S. Three fp16 models on a GPU time every bucket's kernels (cuDNN) before
    they are ready."""
    step_s = float(os.environ.get(STEP_TIMEOUT_VARIABLE) or 0)
    first_load_s = config["duration_s"] + min(3.0, config["duration_s"] / 2) + 10.0  # spawn, warm-up, join
    return max(START_TIMEOUT_S, step_s - WORKERS_START_S - first_load_s)


def _owner_ready(path: Path) -> bool:
    if not path.exists():
        return False
    from service.backends.owner import OwnerBackend

    async def ask() -> bool:
        backend = OwnerBackend(path, ready_timeout_s=2.0)
        try:
            return await backend.ready()
        finally:
            await backend.close()

    return asyncio.run(ask())


def _owner_decoded(path: Path) -> dict[str, dict[str, int]]:
    """Per model, the JPEGs the owner decoded on its device and those its CPU path took instead."""
    from service.backends.owner import OwnerBackend

    async def ask() -> dict[str, dict[str, int]]:
        backend = OwnerBackend(path)
        try:
            return await asyncio.wait_for(backend.decoded(), 10.0)
        finally:
            await backend.close()

    return asyncio.run(ask())


def _http_ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _gpu_index(device: str) -> int | None:
    """NVML's index of a CUDA `device` (the first visible GPU for plain "cuda"), None for the CPU."""
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ordinal = int(index or 0)
    if visible:
        chosen = visible[ordinal].strip() if ordinal < len(visible) else ""
        return int(chosen) if chosen.isdigit() else None
    return ordinal


def run_http_bench(
    ctx: Any, save_partial: Callable[[dict[str, Any]], None] = lambda result: None
) -> dict[str, Any]:
    """Start the owner and the HTTP workers on the models the model steps exported, load each model.
    `save_partial(result)` is called after each stage: a step stopped at its time limit keeps the loads it
    finished."""
    config = ctx.profile["http"]
    models = list(config["models"])
    precision = "fp16" if ctx.profile.get("fp16") else "fp32"
    repository = ctx.repository(precision, models[0], ctx.profile["sizes"].get(models[0]))
    missing = [m for m in models if not (repository / m / "config.pbtxt").is_file()]
    if missing:
        return {"status": "skipped", "reason": f"not exported by the model steps: {', '.join(missing)}"}
    out = Path(ctx.logs)
    out.mkdir(parents=True, exist_ok=True)
    socket_path = Path(tempfile.mkdtemp(prefix="cvserve-", dir="/tmp")) / "owner.sock"
    port = _free_port()
    env = {
        **os.environ,
        "CVSERVE_MODEL_REPOSITORY": str(repository),
        "CVSERVE_MODELS": ",".join(models),
        "CVSERVE_DEVICE": ctx.device,
        "CVSERVE_MAX_BATCH_SIZE": str(config["max_batch"]),
        "CVSERVE_OWNER_SOCKET": str(socket_path),
        "CVSERVE_HOST": "127.0.0.1",
        # The workers read JPEG headers only; the owner decodes each batch's JPEGs on its device.
        "CVSERVE_DEVICE_DECODE": config.get("device_decode", "on"),
    }
    result: dict[str, Any] = {
        "repository": precision, "models": models, "servers": config["servers"], "device": ctx.device,
        "device_decode": env["CVSERVE_DEVICE_DECODE"],
        "stubbed_av": "stubs" in env.get("PYTHONPATH", ""),
    }  # fmt: skip
    started = time.monotonic()
    owner = subprocess.Popen(
        [sys.executable, "-m", "service.owner_app", "--socket", str(socket_path)],
        env=env, stdout=open(out / "http-owner.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    servers = None
    try:
        _wait_for(lambda: _owner_ready(socket_path), owner, "the model owner", owner_start_timeout(config))
        result["owner_start_s"] = round(time.monotonic() - started, 1)
        save_partial(result)
        servers = subprocess.Popen(
            [sys.executable, "-m", "service.http_workers", "--workers", str(config["servers"]), "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            env=env, stdout=open(out / "http-servers.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _http_ready(f"{base}/ready"), servers, "the uvicorn workers")
        result["servers_start_s"] = round(time.monotonic() - started, 1)
        result["loads"] = {}
        result["warm_up_s"] = {}
        save_partial(result)
        for model in models:
            result["warm_up_s"][model] = warm(
                base + ENDPOINTS[model], 2 * config["servers"], config["image_size"]
            )
            measured = load(
                base + ENDPOINTS[model], config["client_processes"], config["concurrency"], config["duration_s"],
                warmup_s=min(3.0, config["duration_s"] / 2), image_size=config["image_size"],
                observe={"owner": [owner.pid], "workers": [servers.pid]}, gpu_index=_gpu_index(ctx.device),
            )  # fmt: skip
            result["loads"][model] = measured
            save_partial(result)
        result["decoded"] = _owner_decoded(socket_path)
    except (RuntimeError, TimeoutError) as error:
        return result | {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    finally:
        if servers is not None:
            _stop(servers)
        _stop(owner)
    failed = [m for m, r in result["loads"].items() if r["errors"] or not r["ok"]]
    reasons = [f"errors or no answers: {failed}"] if failed else []
    if env["CVSERVE_DEVICE_DECODE"] == "on":  # the figures are the device path's only if it decoded the JPEGs
        undecoded = [m for m in models if not result["decoded"].get(m, {}).get("device")]
        if undecoded:
            reasons.append(f"no JPEG decoded on the device for {undecoded} (counts: {result['decoded']})")
    return result | {"status": "failed" if reasons else "ok", **({"reason": "; ".join(reasons)} if reasons else {})}
