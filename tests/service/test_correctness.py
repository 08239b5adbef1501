"""Answers are right on freshly generated shapes scenes (`support.seeds`: never trained on or evaluated).

Needs the trained demo models (`make models`); with untrained weights these tests fail, as they should.
Tolerances: the demo models are small, so each check allows a few misses over its sample,
and every miss is listed in the failure message.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.contract import load_contract
from support.assertions import box_iou
from support.seeds import fresh_seeds
from training.shapes import CLASSES, Scene, make_scene

MIN_ACCURACY = 0.9
MIN_BOX_RECALL = 0.9  # share of drawn boxes found with IoU >= 0.7 and the right label
MIN_BOX_IOU = 0.7
MIN_MEAN_MASK_IOU = 0.8
# ...and a mean cannot hide a broken subset: this share of images must each reach MIN_IMAGE_MASK_IOU.
MIN_IMAGE_MASK_IOU = 0.6
MIN_SHARE_OF_GOOD_IMAGES = 0.85
SCENES = 32  # per check: enough that one hard scene moves a figure by a few percent, not by ten
# The demo detector's recall at IoU 0.7 is ~0.91, close to MIN_BOX_RECALL: 32 scenes (~85 boxes) would
# pass or fail by one box depending on the seeds, so its check measures ten times as many.
DETECTOR_SCENES = 320


@pytest.fixture(scope="module")
def client(embedded_gateway: str) -> httpx.Client:
    with httpx.Client(base_url=embedded_gateway, timeout=120) as session:
        yield session


def scene_size(model_repository: Path, model: str) -> int:
    """The side the model was trained at: the classifier's resize size, else the input height."""
    contract = load_contract(model_repository, model)
    return contract.resize_size or contract.input_size[0]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def post_images(client: httpx.Client, endpoint: str, images: list[np.ndarray], **params: object) -> list[dict]:
    """Send the images in requests of 8 (so they also go through the batch path); results in order."""
    results: list[dict] = []
    for start in range(0, len(images), 8):
        files = [("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images[start : start + 8])]
        response = client.post(endpoint, params=params, files=files)
        assert response.status_code == 200, response.text
        results.extend(response.json()["results"])
    return results


def upscale(scene: Scene, factor: float) -> Scene:
    """The scene resized by `factor` (bilinear image, nearest mask): exercises the geometry mapping."""
    height, width = scene.mask.shape
    size = (round(width * factor), round(height * factor))
    image = np.asarray(Image.fromarray(scene.image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(scene.mask).resize(size, Image.NEAREST))
    return Scene(image=image, boxes=scene.boxes * factor, labels=scene.labels, mask=mask)


def test_classifier_names_the_drawn_shape(client: httpx.Client, model_repository: Path) -> None:
    size = scene_size(model_repository, "classifier")
    seeds = fresh_seeds(32)
    scenes = [make_scene(seed, size, 1, 1) for seed in seeds]
    results = post_images(client, "/classify", [s.image for s in scenes], top_k=1)
    truth = [CLASSES[int(s.labels[0]) - 1] for s in scenes]
    said = [r["predictions"][0]["label"] for r in results]
    misses = [(seed, t, s) for seed, t, s in zip(seeds, truth, said) if t != s]
    accuracy = 1 - len(misses) / len(scenes)
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.2f}; (seed, drawn, said): {misses}"


@pytest.mark.parametrize("factor", [1.0, 1.5], ids=["native", "upscaled"])
def test_detector_finds_each_drawn_box(client: httpx.Client, model_repository: Path, factor: float) -> None:
    size = scene_size(model_repository, "detector")
    seeds = fresh_seeds(DETECTOR_SCENES, offset=1000)
    scenes = [upscale(make_scene(seed, size, 1, 4), factor) for seed in seeds]
    results = post_images(client, "/detect", [s.image for s in scenes], score_threshold=0.5)
    drawn, misses = 0, []
    for seed, scene, result in zip(seeds, scenes, results):
        found = [(np.array(d["box"]), d["label"]) for d in result["detections"]]
        for box, label in zip(scene.boxes, scene.labels):
            drawn += 1
            name = CLASSES[int(label) - 1]
            best = max((box_iou(box, b) for b, lab in found if lab == name), default=0.0)
            if best < MIN_BOX_IOU:
                misses.append((seed, name, [round(float(v)) for v in box], round(best, 2)))
    recall = 1 - len(misses) / drawn
    assert recall >= MIN_BOX_RECALL, f"found {recall:.2f} of {drawn} boxes; misses (seed, label, box, best IoU): {misses}"


def mean_class_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the foreground classes drawn or predicted in the image."""
    classes = (set(np.unique(truth)) | set(np.unique(predicted))) - {0}
    ious = [((predicted == c) & (truth == c)).sum() / ((predicted == c) | (truth == c)).sum() for c in classes]
    return float(np.mean(ious)) if ious else 1.0


@pytest.mark.parametrize("factor", [1.0, 1.5], ids=["native", "upscaled"])
def test_segmenter_mask_matches_the_drawn_mask(client: httpx.Client, model_repository: Path, factor: float) -> None:
    size = scene_size(model_repository, "segmenter")
    labels = load_contract(model_repository, "segmenter").labels
    seeds = fresh_seeds(SCENES, offset=200)
    scenes = [upscale(make_scene(seed, size, 1, 4), factor) for seed in seeds]
    results = post_images(client, "/segment", [s.image for s in scenes])
    ious = []
    for scene, result in zip(scenes, results):
        predicted = np.zeros(scene.mask.shape, dtype=np.uint8)
        for segment in result["segments"]:  # rebuild the class map from the RLEs, as a client would
            predicted[mask_utils.decode(segment["rle"]).astype(bool)] = labels.index(segment["label"])
        ious.append(mean_class_iou(predicted, scene.mask))
    assert np.mean(ious) >= MIN_MEAN_MASK_IOU, f"mean IoU {np.mean(ious):.3f}; per image {np.round(ious, 2)}"
    poor = [(seed, round(iou, 2)) for seed, iou in zip(seeds, ious) if iou < MIN_IMAGE_MASK_IOU]
    share = 1 - len(poor) / len(ious)
    assert share >= MIN_SHARE_OF_GOOD_IMAGES, f"only {share:.2f} of images reach IoU {MIN_IMAGE_MASK_IOU}; (seed, IoU): {poor}"
