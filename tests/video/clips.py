"""Generated clips of the demo shapes moving across a fixed background, with their true boxes."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageDraw

from training.shapes import CLASSES, Shape, shape_polygon

WIDTH, HEIGHT = 160, 128
# (class, colour, lane y, start x, end x): a circle going right in the top lane, a square going left below
MOVERS = (
    ("circle", (220, 40, 40), 36.0, 24.0, 136.0),
    ("square", (30, 60, 210), 92.0, 136.0, 24.0),
)
RADIUS = 18.0


@dataclass(frozen=True)
class Clip:
    """Frames (H×W×3 uint8), and per object its label and its box (xyxy) in each frame."""

    frames: list[np.ndarray]
    labels: list[str]
    boxes: list[list[np.ndarray]]  # boxes[object][frame]


def background(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A soft diagonal grey-green gradient, the same in every frame."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx / width + yy / height) / 2
    low, high = np.array([170, 190, 160], np.float32), np.array([235, 235, 215], np.float32)
    return low + t[..., None] * (high - low)


def moving_shapes(
    frames: int = 30, movers: int = 2, seed: int = 0, width: int = WIDTH, height: int = HEIGHT
) -> Clip:
    """`movers` shapes (see MOVERS) gliding across their lanes over `frames` frames, with light noise."""
    rng = np.random.default_rng(seed)
    scale_x, scale_y = width / WIDTH, height / HEIGHT
    base = background(width, height)
    images, boxes = [], [[] for _ in range(movers)]
    for f in range(frames):
        t = f / max(1, frames - 1)
        canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for m, (label, colour, lane_y, x0, x1) in enumerate(MOVERS[:movers]):
            shape = Shape(
                cls=CLASSES.index(label),
                cx=(x0 + t * (x1 - x0)) * scale_x,
                cy=lane_y * scale_y,
                radius=RADIUS * min(scale_x, scale_y),
                angle=0.3 * math.sin(2 * math.pi * t) if label != "circle" else 0.0,
            )
            outline = shape_polygon(shape)
            draw.polygon(outline, fill=colour)
            xs, ys = [p[0] for p in outline], [p[1] for p in outline]
            boxes[m].append(np.array([min(xs), min(ys), max(xs), max(ys)], np.float32))
        noisy = np.asarray(canvas, np.float32) + rng.normal(0, 4, (height, width, 3))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return Clip(images, [MOVERS[m][0] for m in range(movers)], boxes)


def one_big_shape(frames: int, label: str = "circle", size: int = 128) -> Clip:
    """One large shape (as the classifier was trained on) sliding a little left to right across the centre."""
    base = np.clip(background(size, size), 0, 255).astype(np.uint8)
    images, boxes = [], []
    for f in range(frames):
        shape = Shape(
            CLASSES.index(label), size * (0.42 + 0.16 * f / max(1, frames - 1)), size / 2, 0.32 * size, 0.1
        )
        canvas = Image.fromarray(base)
        outline = shape_polygon(shape)
        ImageDraw.Draw(canvas).polygon(outline, fill=(200, 30, 60))
        images.append(np.asarray(canvas))
        xs, ys = [p[0] for p in outline], [p[1] for p in outline]
        boxes.append(np.array([min(xs), min(ys), max(xs), max(ys)], np.float32))
    return Clip(images, [label], [boxes])


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def encode_video(frames: Sequence[np.ndarray], container: str, fps: int = 10) -> bytes:
    """The frames as a WebM (VP8) or MP4 (H.264) file, encoded by PyAV."""
    codec = {"webm": "libvpx", "mp4": "libx264"}[container]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"b": "1M"} if codec == "libvpx" else {"crf": "18"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def without_decoder(data: bytes, container: str) -> bytes:
    """`data` (from `encode_video`) with its video codec renamed to one FFmpeg has no decoder for: in MP4 the
    sample entry `avc1` becomes `evc1` (MPEG-5 EVC, known to FFmpeg, not decodable without libxevd); in WebM
    the track's CodecID `V_VP8` becomes `V_EVC` (unknown to FFmpeg). Same length: every size stays right."""
    old, new = {"mp4": (b"avc1", b"evc1"), "webm": (b"V_VP8", b"V_EVC")}[container]
    at = data.rindex(old)  # in MP4 the last one: `avc1` is also a compatible brand in `ftyp`
    return data[:at] + new + data[at + len(old) :]


def decode_video(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as source:
        return [frame.to_ndarray(format="rgb24") for frame in source.decode(video=0)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def matched_tracks(
    detections_per_frame: Sequence[list[dict]], truth: Sequence[np.ndarray], label: str
) -> list:
    """Per frame, the track id of the `label` detection that overlaps the true box best (IoU >= 0.5);
    'missed' where none does."""
    ids: list = []
    for found, box in zip(detections_per_frame, truth):
        best = max(
            ((iou(np.array(d["box"]), box), d.get("track_id")) for d in found if d["label"] == label),
            default=(0.0, None),
            key=lambda pair: pair[0],
        )
        ids.append(best[1] if best[0] >= 0.5 else "missed")
    return ids


def dominant_share(ids: Sequence) -> tuple[object, float]:
    """The most common real track id and the share of all frames that carry it."""
    counts = Counter(i for i in ids if i not in (None, "missed"))
    if not counts:
        return None, 0.0
    track, count = counts.most_common(1)[0]
    return track, count / len(ids)
