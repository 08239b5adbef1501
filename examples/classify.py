"""Classify an image with the cvserve client: the top three classes and their scores.

python examples/classify.py [IMAGE] [--url URL]     # default image: examples/images/circle.png
"""
# expects: \Acircle \d\.\d{3}$

import argparse
import os
from pathlib import Path

from cvserve.client import Client

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", type=Path, default=IMAGES / "circle.png")
    parser.add_argument("--url", default=os.environ.get("CVSERVE_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args()

    with Client(args.url) as client:  # the API key, if the gateway has one, comes from $CVSERVE_API_KEY
        answer = client.classify(args.image, top_k=3)
    for prediction in answer.results[0].predictions:
        print(f"{prediction.label} {prediction.score:.3f}")


if __name__ == "__main__":
    main()
