"""Segment an image with the cvserve client and get each class's regions as polygons.

    python examples/segment_polygons.py [IMAGE] [--url URL] [--tolerance PIXELS]

Prints, per class, its polygons and their area next to the area of the class's RLE mask.
"""
# (how many polygons a class gets is the model's answer: a stray speck of a class is a polygon of its own)
# expects: ^cross: \d+ polygons?, \d+ vertices, area \d+ px \(mask \d+ px\)$
# expects: ^square: \d+ polygons?, \d+ vertices, area \d+ px \(mask \d+ px\)$
# expects: ^star: \d+ polygons?, \d+ vertices, area \d+ px \(mask \d+ px\)$

import argparse
import os
from pathlib import Path

import shapely
from pycocotools import mask as mask_utils

from cvserve.client import Client

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", type=Path, default=IMAGES / "shapes.png")
    parser.add_argument("--url", default=os.environ.get("CVSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--tolerance", type=float, default=1.0, help="simplification, in pixels")
    args = parser.parse_args()

    with Client(args.url) as client:
        answer = client.segment(args.image, return_polygons=True, polygon_tolerance=args.tolerance)
    for segment in answer.results[0].segments:
        polygons = segment.polygons or []
        shape = shapely.MultiPolygon([shapely.Polygon(p.exterior, p.holes) for p in polygons])
        vertices = sum(len(p.exterior) + sum(len(hole) for hole in p.holes) for p in polygons)
        mask_area = mask_utils.area(segment.rle.model_dump())
        count = f"{len(polygons)} polygon{'s' if len(polygons) != 1 else ''}"
        print(
            f"{segment.label}: {count}, {vertices} vertices, area {shape.area:.0f} px (mask {mask_area} px)"
        )


if __name__ == "__main__":
    main()
