"""Ask the gateway for all three tasks at once with the asyncio client.

python examples/client_async.py [IMAGE] [--url URL]
"""
# expects: ^classify: \w+ 0\.\d+$
# expects: ^detect: \d boxes: cross(, cross)*, square, star$
# expects: ^segment: cross \d+\.\d%, square \d+\.\d%, star \d+\.\d%$

import argparse
import asyncio
import os
from pathlib import Path

from cvserve.client import AsyncClient

IMAGES = Path(__file__).resolve().parent / "images"


async def ask_all(url: str, image: Path) -> None:
    async with AsyncClient(url) as client:
        classified, detected, segmented = await asyncio.gather(
            client.classify(image, top_k=1),
            client.detect(image, score_threshold=0.5),
            client.segment(image),
        )
    best = classified.results[0].predictions[0]
    print(f"classify: {best.label} {best.score:.3f}")
    labels = sorted(d.label for d in detected.results[0].detections)
    print(f"detect: {len(labels)} boxes: {', '.join(labels)}")
    shares = sorted((s.label, s.pixel_fraction) for s in segmented.results[0].segments)
    print("segment: " + ", ".join(f"{label} {share:.1%}" for label, share in shares))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", type=Path, default=IMAGES / "shapes.png")
    parser.add_argument("--url", default=os.environ.get("CVSERVE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args()
    asyncio.run(ask_all(args.url, args.image))


if __name__ == "__main__":
    main()
