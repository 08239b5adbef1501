"""A client that floods a stream costs the server bounded memory: a real uvicorn process, its RSS watched."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from websockets.sync.client import connect

from support.ports import free_port
from support.process import HttpServer, start_server
from tests.video.clips import jpeg, moving_shapes

ROOT = Path(__file__).resolve().parents[2]
MAX_GROWTH_MB = 60.0  # RSS the server may gain while flooded, over its warmed-up size
FLOOD_MB = 5 * MAX_GROWTH_MB  # the flood is measured in bytes sent, not seconds: a slow machine sends longer
FLOOD_LIMIT_S = 90.0  # ... up to this long


@pytest.fixture(scope="module")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_MODELS": "detector",
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_STREAM_MAX_FPS": "1000",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.video.flood_app:make_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    server = start_server("flood-gateway", command, port, "/ready", tmp_path_factory.mktemp("flood"), env=env)
    try:
        yield server
    finally:
        server.stop()


def big_frames() -> list[bytes]:
    """640x480 frames of the moving shapes over noise: about 200 KB each as JPEG."""
    rng = np.random.default_rng(5)
    clip = moving_shapes(8, width=640, height=480)
    frames = []
    for frame in clip.frames:
        noisy = frame.astype(np.int16) + rng.integers(-40, 40, frame.shape, dtype=np.int16)
        frames.append(jpeg(np.clip(noisy, 0, 255).astype(np.uint8), quality=95))
    return frames


def test_a_flooding_client_costs_bounded_memory(server: HttpServer) -> None:
    process = psutil.Process(server.process.pid)
    frames = big_frames()
    url = f"ws://127.0.0.1:{server.port}/stream/detect?annotate=jpeg"  # each answer carries its drawing
    with connect(url, max_size=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(30))["type"] == "ready"
        for frame in frames * 3:  # warm up: every code path and buffer once, in lock step
            ws.send(frame)
            assert json.loads(ws.recv(30))["type"] == "result"
        baseline = process.memory_info().rss
        peak, sent_bytes, sent = baseline, 0, 0
        answers: list[dict] = []

        def read_answers() -> None:
            for message in ws:
                answers.append(json.loads(message))
                if answers[-1].get("frame") == last_frame[0]:
                    return

        last_frame = [-1]
        reader = threading.Thread(target=read_answers, daemon=True)
        reader.start()
        began = time.monotonic()
        while sent_bytes < FLOOD_MB * 2**20 and time.monotonic() - began < FLOOD_LIMIT_S:
            frame = frames[sent % len(frames)]
            ws.send(frame)  # never waits for an answer
            sent, sent_bytes = sent + 1, sent_bytes + len(frame)
            if sent % 20 == 0:
                peak = max(peak, process.memory_info().rss)
        flood_s = time.monotonic() - began
        last_frame[0] = len(frames) * 3 + sent - 1  # the server numbers every frame of the stream
        reader.join(60)
        peak = max(peak, process.memory_info().rss)
    assert answers and answers[-1]["frame"] == last_frame[0], "the last frame sent was not answered"
    stats = answers[-1]["stats"]
    growth_mb = (peak - baseline) / 2**20
    unanswered_mb = (sent_bytes - stats["answered"] * sent_bytes / sent) / 2**20
    print(f"sent {sent} frames ({sent_bytes / 2**20:.0f} MiB) in {flood_s:.1f} s; stats {stats}; "
          f"server RSS {baseline / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB")  # fmt: skip
    assert stats["dropped_stale"] > 0 and stats["answered"] < sent, stats
    assert stats["received"] == len(frames) * 3 + sent
    # A queue of the unanswered frames would hold `unanswered_mb`: far more than the bound allows.
    assert unanswered_mb > 3 * MAX_GROWTH_MB, f"the flood was too small to tell ({unanswered_mb:.0f} MiB)"
    assert growth_mb < MAX_GROWTH_MB, f"server RSS grew {growth_mb:.0f} MiB while flooded"
