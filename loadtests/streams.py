"""Streams/s and frames/s over the WebSocket streams, per model, against the gateway's API in a real uvicorn.

The server is `create_api` over the embedded backend (the code `make serve` runs in its replica) in its
own process, all three models, `stream_max_fps` lifted to 1000 so the machine is measured, not the cap.
For each model, one after another:

1. setup: streams opened back to back (handshake, `ready`, one frame answered, close) -> streams/s;
2. lock step, N streams at once: each sends its next frame when its answer comes -> frames/s answered
   (all streams together) and client-side latency p50/p95; frames of the N streams share batches;
3. flood: one stream sends frames without waiting for answers -> frames/s answered, share dropped.

Frames: 320x240 JPEGs of the demo shapes. Run: `python -m loadtests.streams` (about a minute; prints a
Markdown table, `--out` writes the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from support.ports import free_port
from support.process import start_server
from tasks import TASKS
from training.shapes import make_scene

ROOT = Path(__file__).resolve().parents[1]
MODELS = {model: task.endpoint for model, task in TASKS.items()}


def make_app() -> FastAPI:
    """`uvicorn --factory loadtests.streams:make_app`: the API over the embedded backend, settings from CVSERVE_*."""
    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings

    settings = Settings()
    return create_api(settings, LocalBackend(settings))


def frames(count: int = 16) -> list[bytes]:
    """320x240 JPEG scenes of one to three shapes."""
    encoded = []
    for seed in range(count):
        image = Image.fromarray(make_scene(7_000_000 + seed, 240, 1, 3).image).resize((320, 240))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


async def _open(url: str) -> ClientConnection:
    ws = await connect(url, max_size=None, open_timeout=30)
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws


async def setup_rate(url: str, images: list[bytes], seconds: float) -> dict[str, float]:
    """Streams opened, answered once and closed, back to back."""
    opened, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        ws = await _open(url)
        await ws.send(images[opened % len(images)])
        assert json.loads(await ws.recv())["type"] == "result"
        await ws.close()
        opened += 1
    return {"streams_per_s": opened / (time.perf_counter() - began), "streams": opened}


async def lock_step(url: str, images: list[bytes], streams: int, seconds: float) -> dict[str, float]:
    """`streams` streams at once, each sending its next frame when its answer comes."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one(offset: int) -> int:
        ws = await _open(url)
        answered = 0
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await ws.send(images[(offset + answered) % len(images)])
            answer = json.loads(await ws.recv())
            assert answer["type"] == "result", answer
            latencies.append(1000 * (time.perf_counter() - sent))
            answered += 1
        await ws.close()
        return answered

    began = time.perf_counter()
    answered = sum(await asyncio.gather(*(one(i) for i in range(streams))))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "streams": streams,
        "frames_per_s": answered / elapsed,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
    }


async def flood(url: str, images: list[bytes], seconds: float) -> dict[str, float]:
    """One stream that sends without waiting; answered frames/s and the share dropped."""
    ws = await _open(url)
    sent, began = 0, time.perf_counter()
    last: dict[str, Any] = {}

    async def read() -> None:
        nonlocal last
        async for message in ws:
            last = json.loads(message)
            if last.get("frame") == final[0]:
                return

    final = [-1]
    reader = asyncio.create_task(read())
    while time.perf_counter() - began < seconds:
        await ws.send(images[sent % len(images)])
        sent += 1
    final[0] = sent - 1
    await asyncio.wait_for(reader, 60)
    elapsed = time.perf_counter() - began
    await ws.close()
    stats = last["stats"]
    return {
        "sent_per_s": sent / elapsed,
        "frames_per_s": stats["answered"] / elapsed,
        "dropped_share": (stats["dropped_stale"] + stats["dropped_rate"]) / stats["received"],
    }


async def measure(base: str, images: list[bytes], seconds: float, concurrency: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model, endpoint in MODELS.items():
        url = f"{base}/stream{endpoint}"
        await lock_step(url, images, 1, 1.0)  # warm the path
        results[model] = {
            "setup": await setup_rate(url, images, 0.6 * seconds),
            "lock_step": [await lock_step(url, images, n, seconds) for n in concurrency],
            "flood": await flood(url, images, 0.8 * seconds),
        }
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        "| model | streams/s (open, 1 frame, close) | lock step: streams → frames/s (p50 / p95 ms) | flood: sent/s → answered/s (dropped) |",
        "|---|---|---|---|",
    ]
    for model, r in results.items():
        steps = "; ".join(
            f"{s['streams']} → {s['frames_per_s']:.1f} ({s['p50_ms']:.0f} / {s['p95_ms']:.0f})"
            for s in r["lock_step"]
        )
        f = r["flood"]
        rows.append(
            f"| {model} | {r['setup']['streams_per_s']:.1f} | {steps} | "
            f"{f['sent_per_s']:.0f} → {f['frames_per_s']:.1f} ({100 * f['dropped_share']:.0f}%) |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each lock-step measurement")
    parser.add_argument("--streams", default="1,4", help="concurrent lock-step streams, comma-separated")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CVSERVE_MODEL_REPOSITORY": str(args.model_repository.resolve()),
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_STREAM_MAX_FPS": "1000",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "loadtests.streams:make_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        server = start_server("streams-gateway", command, port, "/ready", Path(logs), env=env)
        try:
            concurrency = [int(n) for n in args.streams.split(",")]
            results = asyncio.run(measure(f"ws://127.0.0.1:{port}", frames(), args.seconds, concurrency))
        finally:
            server.stop()
    report = {
        "results": results,
        "seconds": args.seconds,
        "wall_s": time.perf_counter() - began,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
    }
    print(table(results))
    print(f"\n{report['wall_s']:.0f} s; load average at the end {report['machine']['load_avg'][0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
