"""JPEG decode on the device (nvJPEG, batched) against Pillow on the CPU, and decode + letterbox both ways:
images/s, and how far the device's model input is from the CPU path's (service/core/device_decode.py)."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from service.contract import ModelContract, TensorSpec
from service.core.device_decode import TOLERANCE, DevicePreparer
from service.core.pipeline import TaskPipeline
from service.handlers import HANDLERS
from service.imaging.images import decode_image
from service.settings import Settings
from training.shapes import make_scene


DISTINCT_SCENES = 4  # drawing a 1920-px scene takes ~0.75 s: 32 of them cost the H200 run its decode step


def jpegs(width: int, height: int, count: int) -> list[bytes]:
    """`count` JPEGs (quality 90) at `width`×`height`: `DISTINCT_SCENES` seeded scenes, repeated."""
    blobs = []
    for seed in range(min(count, DISTINCT_SCENES)):
        scene = make_scene(seed, max(width, height), 2, 6).image[:height, :width]
        buffer = io.BytesIO()
        Image.fromarray(scene).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return [blobs[i % len(blobs)] for i in range(count)]


def letterbox_pipeline(side: int) -> TaskPipeline:
    """The detector's preparation (letterbox to `side`), without a model repository."""
    contract = ModelContract(
        name="detector", task="detection", inputs=(TensorSpec("IMAGE", "uint8", (3, side, side)),), outputs=(),
        labels=(), max_batch_size=0, parameters={"task": "detection", "preprocess": "letterbox"},
    )  # fmt: skip
    return TaskPipeline("detector", contract, HANDLERS["detector"], Settings())


def _rate(
    run: Callable[[], object], images: int, duration_s: float, device: torch.device
) -> dict[str, float]:
    run()  # warm-up (nvJPEG handles, kernels)
    times: list[float] = []
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline or not times:
        began = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return {
        "images_per_s": round(images * len(times) / sum(times), 1),
        "batch_ms_p50": round(1000 * statistics.median(times), 2),
    }


def measure_decode(device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    """For each size: Pillow one at a time, the device's batch decode, and decode + letterbox both ways."""
    batch, duration = int(config["batch"]), float(config["duration_s"])
    pipeline = letterbox_pipeline(int(config["letterbox"]))
    preparer = DevicePreparer(pipeline, device)
    rows, worst = [], {"mean_abs": 0.0, "p99_abs": 0.0}
    for width, height in config["sizes"]:
        blobs = jpegs(width, height, batch)
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        row: dict[str, Any] = {
            "size": f"{width}x{height}",
            "batch": batch,
            "mean_bytes": int(np.mean([len(b) for b in blobs])),
        }
        row["pillow_decode"] = _rate(
            lambda: [decode_image(b, 10**9, ("JPEG",)) for b in blobs], batch, duration, device
        )
        row["device_decode"] = _rate(
            lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device), batch, duration, device
        )
        row["cpu_prepare"] = _rate(lambda: [pipeline.prepare(b) for b in blobs], batch, duration, device)
        row["device_prepare"] = _rate(lambda: preparer.prepare(blobs), batch, duration, device)
        on_device, _ = preparer.prepare(blobs)
        expected = np.stack([pipeline.prepare(b)[0] for b in blobs]).astype(np.int16)
        diff = np.abs(on_device.cpu().numpy().astype(np.int16) - expected)
        row["diff"] = {
            "mean_abs": round(float(diff.mean()), 3),
            "p99_abs": float(np.percentile(diff, 99)),
            "max_abs": int(diff.max()),
        }
        worst = {k: max(worst[k], row["diff"][k]) for k in worst}
        rows.append(row)
    within = worst["mean_abs"] <= TOLERANCE.mean_abs and worst["p99_abs"] <= TOLERANCE.p99_abs
    return {
        "rows": rows,
        "tolerance": {"mean_abs": TOLERANCE.mean_abs, "p99_abs": TOLERANCE.p99_abs},
        "worst": worst,
        "passed": within,
        "decoded_on_device": preparer.decoded_on_device,
        "decoded_on_cpu": preparer.decoded_on_cpu,
    }
