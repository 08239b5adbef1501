"""Answer formats: the size of JSON and MessagePack answers (`Accept: application/msgpack`) and the time to
encode them in the gateway and to decode them in a client, for large segmentation masks and for detections.

One run: build the API over the embedded backend in this process (`create_api` + `LocalBackend`, what
`make serve` runs in its replica), send each case's images once per format through the real routes, check
that both answers carry the same document, then time the server's encoding (`model_dump_json` vs
`service.core.answers.encode_msgpack`, on the response object rebuilt from the answer) and the client's
decoding (`json.loads` vs `msgpack.unpackb`), medians of repeated runs. Prints a Markdown section.
Run: `python -m loadtests.answer_formats` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MSGPACK = "application/msgpack"


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str
    images: int
    side: int  # pixels, square images
    options: dict[str, str]
    tiles: int = 1  # scenes per row and column: more shapes, larger masks and polygon lists


CASES = (
    Case("segment, 1 image 2048², return_png", "/segment", 1, 2048, {"return_png": "true"}),
    Case("segment, 1 image 2048² (2×2 scenes), return_png + polygons", "/segment", 1, 2048, {"return_png": "true", "return_polygons": "true"}, tiles=2),
    Case("segment, 16 images 1024² (2×2 scenes), return_png + polygons", "/segment", 16, 1024, {"return_png": "true", "return_polygons": "true"}, tiles=2),
    Case("segment, 16 images 512², RLE only", "/segment", 16, 512, {}),
    Case("detect, 16 images 512²", "/detect", 16, 512, {"score_threshold": "0.3"}),
)  # fmt: skip


def scene_png(seed: int, side: int, tiles: int) -> bytes:
    """`tiles`×`tiles` generated shapes scenes (what the demo models learnt) side by side, scaled to `side`, as PNG."""
    import numpy as np
    from PIL import Image

    from training.shapes import make_scene

    scenes = [make_scene(800_000 + seed * 16 + i, 128, 3, 4).image for i in range(tiles * tiles)]
    pixels = np.concatenate([np.concatenate(scenes[r * tiles : (r + 1) * tiles], 1) for r in range(tiles)], 0)
    image = Image.fromarray(pixels).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def median_ms(work: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def measure(client: Any, case: Case, repeats: int) -> dict[str, float]:
    """Bytes, server encode ms and client decode ms of one case's answer in both formats."""
    import msgpack

    from service.core.answers import encode_msgpack
    from service.handlers import HANDLERS

    files = [
        ("files", (f"{i}.png", scene_png(i, case.side, case.tiles), "image/png")) for i in range(case.images)
    ]
    answers = {}
    for accept in ("application/json", MSGPACK):
        response = client.post(case.endpoint, params=case.options, files=files, headers={"Accept": accept})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == accept
        answers[accept] = response.content
    document = msgpack.unpackb(answers[MSGPACK])
    for result in document["results"]:
        if isinstance(result.get("png"), bytes):
            result["png"] = base64.b64encode(result["png"]).decode()
    assert document == json.loads(answers["application/json"]), "the two formats disagree"
    handler = next(h for h in HANDLERS.values() if h.endpoint == case.endpoint)
    response_model = handler.response.model_validate_json(answers["application/json"])
    return {
        "json_bytes": len(answers["application/json"]),
        "msgpack_bytes": len(answers[MSGPACK]),
        "json_encode_ms": median_ms(response_model.model_dump_json, repeats),
        "msgpack_encode_ms": median_ms(lambda: encode_msgpack(response_model), repeats),
        "json_decode_ms": median_ms(lambda: json.loads(answers["application/json"]), repeats),
        "msgpack_decode_ms": median_ms(lambda: msgpack.unpackb(answers[MSGPACK]), repeats),
    }


def report(rows: list[tuple[Case, dict[str, float]]], repeats: int) -> str:
    """The Markdown section for loadtests/RESULTS.md."""
    intro = (
        f"`python -m loadtests.answer_formats`: {platform.machine()}, {os.cpu_count()} CPU cores (shared), "
        f"Python {platform.python_version()}; the embedded demo models in-process, each case's answer fetched "
        "once per format through the real route and checked to carry the same document; encode = the gateway "
        "turning the response object into the body, decode = a client turning the body into Python objects "
        f"(median of {repeats}). Ratio = MessagePack / JSON (below 1: MessagePack is smaller or faster)."
    )
    columns = (
        "case", "JSON bytes", "msgpack bytes", "size ratio", "encode JSON ms", "encode msgpack ms", "encode ratio",
        "decode JSON ms", "decode msgpack ms", "decode ratio",
    )  # fmt: skip
    lines = [
        f"## Answer formats: JSON vs MessagePack (issue 16.3, {time.strftime('%Y-%m-%d')})",
        "",
        intro,
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for case, m in rows:
        lines.append(
            f"| {case.name} | {m['json_bytes']:,} | {m['msgpack_bytes']:,} | {m['msgpack_bytes'] / m['json_bytes']:.2f} "
            f"| {m['json_encode_ms']:.3f} | {m['msgpack_encode_ms']:.3f} | "
            f"{m['msgpack_encode_ms'] / m['json_encode_ms']:.2f} | {m['json_decode_ms']:.3f} | "
            f"{m['msgpack_decode_ms']:.3f} | {m['msgpack_decode_ms'] / m['json_decode_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient

    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings

    settings = Settings(
        model_repository=args.repository.resolve(),
        models=("detector", "segmenter"),
        device="cpu",
        torch_threads=1,
    )
    with TestClient(create_api(settings, LocalBackend(settings))) as client:
        rows = [(case, measure(client, case, args.repeats)) for case in CASES]
    print(report(rows, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
