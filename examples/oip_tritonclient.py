"""Detect shapes with an unmodified tritonclient over the gateway's Open Inference Protocol routes (/v2).

python examples/oip_tritonclient.py [IMAGE] [--url URL]     # default image: examples/images/shapes.png

The image goes as the BYTES input IMAGE (the encoded file, binary tensor data); the options go as
parameters; the outputs are typed tensors (BOXES, SCORES, LABELS, COUNT) and RESULT, the same JSON
per image that POST /detect answers.
"""
# expects: ^cross +0\.\d+ +\[[\d., ]+\]$
# expects: ^square +0\.\d+ +\[[\d., ]+\]$
# expects: ^star +0\.\d+ +\[[\d., ]+\]$
# expects: ^RESULT is the /detect answer: True$

import argparse
import json
import os
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as triton_http

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", type=Path, default=IMAGES / "shapes.png")
    parser.add_argument("--url", default=os.environ.get("CVSERVE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args()
    key = os.environ.get("CVSERVE_API_KEY")
    headers = {"X-API-Key": key} if key else {}

    # tritonclient takes host:port[/path] without the scheme
    server = args.url.removeprefix("http://").removeprefix("https://")
    client = triton_http.InferenceServerClient(server, ssl=args.url.startswith("https://"))
    image = triton_http.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([args.image.read_bytes()], dtype=object))
    answer = client.infer("detector", [image], parameters={"score_threshold": 0.5}, headers=dict(headers))
    count = int(answer.as_numpy("COUNT")[0])
    boxes, scores = answer.as_numpy("BOXES")[0], answer.as_numpy("SCORES")[0]
    for label, score, box in zip(answer.as_numpy("LABELS")[0][:count], scores, boxes):
        x1, y1, x2, y2 = box  # original-image pixels
        print(f"{label.decode():<8} {score:.3f} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")

    detect = httpx.post(
        f"{args.url}/detect?score_threshold=0.5",
        content=args.image.read_bytes(),
        headers={"Content-Type": "application/octet-stream", **headers},
        timeout=60,
    )
    detect.raise_for_status()
    same = json.loads(answer.as_numpy("RESULT")[0]) == detect.json()["results"][0]
    print(f"RESULT is the /detect answer: {same}")


if __name__ == "__main__":
    main()
