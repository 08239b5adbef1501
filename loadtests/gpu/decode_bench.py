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

from service.backends.base import Encoded
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


def _victims_survive(
    decode: Callable[[], object], shape: tuple[int, ...], device: torch.device, victims: int
) -> bool:
    """Whether `victims` tensors read by kernels still queued on the current stream when they were freed
    came through `decode()` unharmed (pytorch/vision#9606: nvJPEG writes its outputs, allocated on the
    current stream, before that stream's queued work has run). Each victim has the decoded images' size,
    so the allocator's freed block fits a decode output. On the CPU there is no queue: they always do."""
    blocks = [torch.full(shape, i + 1, dtype=torch.uint8, device=device) for i in range(victims)]
    expected = [(i + 1) * blocks[i].numel() for i in range(victims)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the reads, on the current stream
    sums = [block.sum(dtype=torch.int64) for block in blocks]  # queued: they read the victims later
    del blocks  # freed now, their reads still queued
    decode()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [int(total) for total in sums] == expected


def stream_safety(
    device: torch.device, blobs: list[bytes], pipeline: TaskPipeline, iterations: int
) -> dict[str, Any]:
    """The hazard of pytorch/vision#9606, provoked `iterations` times: victims freed on the current stream
    with their reads queued, then a decode. `preparer`: the serving path (DevicePreparer, which decodes on
    a stream of its own; it must leave every victim whole); `torchvision`: decode_jpeg on the current
    stream, as torchvision's own example does (how this image's torchvision and GPU behave; reported)."""
    preparer = DevicePreparer(pipeline, device)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    shape = tuple(decode_jpeg(tensors[0], mode=ImageReadMode.RGB, device=device).shape)
    encoded = [Encoded(b, 1) for b in blobs]
    runs = {
        "preparer": lambda: preparer.prepare_each(encoded),
        "torchvision": lambda: decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device),
    }
    result: dict[str, Any] = {"iterations": iterations, "stalled": device.type == "cuda"}
    for name, run in runs.items():
        run()  # warm-up: nvJPEG's handles, and the allocator's blocks of the decode's sizes
        result[name] = sum(not _victims_survive(run, shape, device, len(blobs)) for _ in range(iterations))
    result["passed"] = result["preparer"] == 0
    return result


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
    width, height = config["sizes"][0]
    iterations = int(config.get("safety_iterations", 20))
    safety = stream_safety(device, jpegs(width, height, 4), pipeline, iterations)
    return {
        "rows": rows,
        "tolerance": {"mean_abs": TOLERANCE.mean_abs, "p99_abs": TOLERANCE.p99_abs},
        "worst": worst,
        "stream_safety": safety,
        "passed": within and safety["passed"],
        "decoded_on_device": preparer.decoded_on_device,
        "decoded_on_cpu": preparer.decoded_on_cpu,
    }
