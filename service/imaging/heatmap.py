"""An explanation's grid drawn over its image: the `overlay_png` of `explain_overlay=true`."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

OVERLAY_MAX_PIXELS = 512 * 512  # overlays are previews: at most this many pixels
ALPHA = 0.55  # the heat's opacity where it is strongest
# A perceptual blue → cyan → yellow → red ramp for 0..1
_STOPS = np.array([0.0, 0.33, 0.66, 1.0])
_COLOURS = np.array([[40, 60, 200], [0, 200, 220], [250, 220, 0], [230, 20, 20]], dtype=np.float64)


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as RGB floats (the ramp above)."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=1)
    return rgb.reshape(*values.shape, 3)


def overlay_png(image: np.ndarray, grid: np.ndarray, region: Sequence[float], full_size: tuple[int, int]) -> str:
    """Base64 PNG of `image` (an RGB display copy of a `full_size` (width, height) image) with `grid` drawn
    over `region` (xyxy in full-size pixels): cells scaled by the grid's largest value (negative ones as 0),
    smoothed bilinearly, over the image in grey; outside the region the image is dimmed (the model did not see it)."""
    height, width = image.shape[:2]
    sx, sy = width / full_size[0], height / full_size[1]
    x1, y1 = int(round(region[0] * sx)), int(round(region[1] * sy))
    x2, y2 = max(x1 + 1, int(round(region[2] * sx))), max(y1 + 1, int(round(region[3] * sy)))
    x2, y2 = min(x2, width), min(y2, height)
    out = image.astype(np.float64) * 0.5  # dimmed outside the region
    peak = float(np.max(grid, initial=0.0))
    scaled = np.clip(np.asarray(grid, dtype=np.float32) / peak, 0, 1) if peak > 0 else np.zeros_like(grid, np.float32)
    heat = np.asarray(
        Image.fromarray(scaled.astype(np.float32)).resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR)
    )
    alpha = (ALPHA * np.sqrt(np.clip(heat, 0, 1)))[..., None]
    crop = image[y1:y2, x1:x2].astype(np.float64)
    inside = (crop @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=2)  # grey: the heat's colours read
    out[y1:y2, x1:x2] = inside * (1 - alpha) + colourise(heat) * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
