"""Detect shapes with the cvserve client, and save the boxes drawn on the image.

python examples/detect_annotate.py [IMAGE] [--url URL] [--out detections.png]
"""
# expects: ^cross +0\.\d+ +\[[\d., ]+\]$
# expects: ^square +0\.\d+ +\[[\d., ]+\]$
# expects: ^star +0\.\d+ +\[[\d., ]+\]$
# expects: ^wrote detections\.png \(128x128\)$

import argparse
import io
import os
from pathlib import Path

from PIL import Image

from cvserve.client import Client

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", type=Path, default=IMAGES / "shapes.png")
    parser.add_argument("--url", default=os.environ.get("CVSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--out", type=Path, default=Path("detections.png"))
    args = parser.parse_args()

    with Client(args.url) as client:
        drawn = client.detect(args.image, score_threshold=0.5, annotate="png")
    for detection in drawn.response.results[0].detections:
        x1, y1, x2, y2 = detection.box  # original-image pixels
        print(f"{detection.label:<8} {detection.score:.3f} [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    args.out.write_bytes(drawn.images[0])
    width, height = Image.open(io.BytesIO(drawn.images[0])).size
    print(f"wrote {args.out} ({width}x{height})")


if __name__ == "__main__":
    main()
