"""Checks the tests share: the gateway's error answers and how well two boxes overlap."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import numpy as np


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    """The documented status with the JSON error body, saying something useful and nothing internal."""
    assert response.status_code == status, f"{response.status_code}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    message = body["error"]["message"]
    assert message and "Traceback" not in message and "PIL" not in message and "ray" not in message.lower()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def box_iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Intersection over union of two xyxy boxes (lists or arrays); two equal empty boxes count as 1."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else float(np.array_equal(a, b))
