"""What an explanation costs (issue 28): ms per image for each method and model, in process.

Builds the API over the embedded backend in this process (`create_api` + `LocalBackend`, default runtime
choice, models warmed up at every batch size as `make serve` does), sends one image per request through
`TestClient` and times each request from send to answer: first without `explain` (the baseline), then with
each method the model offers and a few grid sizes, on fresh one-shape (classifier) or 1-3-shape (detector,
segmenter) scenes. Prints a Markdown table (median and p90 ms per image, passes, times the plain answer)
and writes the figures as JSON. Run: `python -m loadtests.explain_cost [--images 12] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

CASES: dict[str, list[tuple[str, int | None]]] = {  # model → (method, grid); None: no explanation
    "classifier": [(None, None), ("occlusion", 4), ("occlusion", 8), ("occlusion", 16), ("saliency", 8),  # type: ignore[list-item]
                   ("gradcam", 8)],
    "detector": [(None, None), ("occlusion", 4), ("occlusion", 8)],  # type: ignore[list-item]
    "segmenter": [(None, None), ("occlusion", 4), ("occlusion", 8)],  # type: ignore[list-item]
}  # fmt: skip
ENDPOINTS = {"classifier": "/classify", "detector": "/detect", "segmenter": "/segment"}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def measure(repository: Path, images: int) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings
    from support.seeds import fresh_seeds
    from training.shapes import make_scene

    settings = Settings(model_repository=repository, device="cpu")
    backend = LocalBackend(settings)
    rows = []
    with TestClient(create_api(settings, backend)) as client:
        runtimes = backend.runtimes()
        for model, cases in CASES.items():
            shapes = (1, 1) if model == "classifier" else (1, 3)
            size = 96 if model == "classifier" else 128
            blobs = [_png(make_scene(seed, size, *shapes).image) for seed in fresh_seeds(images, offset=30_000)]
            for method, grid in cases:
                query = f"explain={method}&explain_grid={grid}" if method else ""
                url = f"{ENDPOINTS[model]}?{query}"
                warm = client.post(url, content=blobs[0], headers={"Content-Type": "image/png"})
                assert warm.status_code == 200, warm.text  # also loads the gradient model once
                times, passes = [], []
                for blob in blobs:
                    began = time.perf_counter()
                    response = client.post(url, content=blob, headers={"Content-Type": "image/png"})
                    times.append((time.perf_counter() - began) * 1000)
                    assert response.status_code == 200, response.text
                    passes.append(_passes(response.json()["results"][0]))
                rows.append(
                    {
                        "model": model,
                        "runtime": runtimes[model],
                        "method": method or "none",
                        "grid": grid,
                        "images": len(times),
                        "median_ms": round(statistics.median(times), 1),
                        "p90_ms": round(float(np.percentile(times, 90)), 1),
                        "passes": max(passes) + 1 if method else 1,
                    }
                )
                print(rows[-1], flush=True)
    return rows


def _passes(result: dict[str, Any]) -> int:
    """Extra passes the explanation of one image took (0 if nothing was explained)."""
    answers = [result, *result.get("detections", []), *result.get("segments", [])]
    return max((a["explanation"]["passes"] for a in answers if a.get("explanation")), default=0)


def table(rows: list[dict[str, Any]]) -> str:
    base = {row["model"]: row["median_ms"] for row in rows if row["method"] == "none"}
    lines = [
        "| model (runtime) | method | grid | passes / image | median ms / image | p90 ms | × plain answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} ({row['runtime']}) | {row['method']} | {row['grid'] or '-'} | {row['passes']} | "
            f"{row['median_ms']} | {row['p90_ms']} | {row['median_ms'] / base[row['model']]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.repository.resolve(), args.images)
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
