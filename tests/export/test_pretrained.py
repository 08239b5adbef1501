"""`--weights pretrained` works offline from a filled TORCH_HOME cache, through torchvision's API.

No weights can be downloaded here, so the cache holds random-init state dicts of the right
architectures under the file names torchvision expects (hub/checkpoints/<basename of the URL>).
torch.hub verifies the URL's hash prefix only while downloading, never for a cached file, so a
random state dict is accepted there; the exported outputs must then equal that state dict's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

from service.backends.torchscript import load_torchscript
from service.contract import load_contract
from tests.export.support import (
    assert_classifier_matches,
    assert_detections_agree,
    assert_detector_matches,
    run_export,
    run_in_fresh_process,
    run_onnx,
)
from training.shapes import make_scene

CLASSIFIER_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
DETECTOR_WEIGHTS = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1
DETECTOR_TEST_SIZE = 320  # 800 (the COCO scale) is minutes per image on two shared cores
# Any download attempt fails at once instead of hanging: proves the export never went online.
OFFLINE = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
}


@dataclass(frozen=True)
class PretrainedExport:
    torch_home: Path
    out: Path
    cpu_out: Path
    classifier: nn.Module
    detector: nn.Module


def cache_file(torch_home: Path, url: str) -> Path:
    return torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> PretrainedExport:
    """Fill a fake TORCH_HOME, then export both pretrained models with the real CLI, offline."""
    root = tmp_path_factory.mktemp("pretrained")
    torch_home = root / "torch_home"
    torch.manual_seed(99)
    classifier = resnet50(weights=None, num_classes=len(CLASSIFIER_WEIGHTS.meta["categories"])).eval()
    detector = fasterrcnn_resnet50_fpn_v2(
        weights=None,
        weights_backbone=None,
        num_classes=len(DETECTOR_WEIGHTS.meta["categories"]),
        min_size=DETECTOR_TEST_SIZE,
        max_size=DETECTOR_TEST_SIZE,
    ).eval()
    for weights, model in ((CLASSIFIER_WEIGHTS, classifier), (DETECTOR_WEIGHTS, detector)):
        path = cache_file(torch_home, weights.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)

    out, cpu_out = root / "model_repository", root / "cpu_repository"
    env = {"TORCH_HOME": str(torch_home), **OFFLINE}
    common = ("--weights", "pretrained", "--out", str(out), "--cpu-out", str(cpu_out))
    # Side by side: each export is one mostly single-threaded process (scripting, ONNX tracing), and
    # each model commits its own directory of the repository (export/repository.py's staging).
    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(run_export, "classifier", *common, env=env),
            pool.submit(run_export, "detector", *common, "--input-size", str(DETECTOR_TEST_SIZE), env=env),
        ]
        for done in (run.result() for run in runs):
            assert done.returncode == 0, done.stderr
    return PretrainedExport(torch_home, out, cpu_out, classifier, detector)


def test_classifier_takes_names_and_preprocessing_from_the_weights(pretrained: PretrainedExport) -> None:
    contract = load_contract(pretrained.out, "classifier")
    transforms = CLASSIFIER_WEIGHTS.transforms()
    assert contract.labels == tuple(CLASSIFIER_WEIGHTS.meta["categories"])
    assert contract.input_size == (transforms.crop_size[0], transforms.crop_size[0])
    assert contract.resize_size == transforms.resize_size[0]
    assert contract.parameters["weights"] == "pretrained:ResNet50_Weights.IMAGENET1K_V2"
    assert contract.outputs[0].dims == (len(CLASSIFIER_WEIGHTS.meta["categories"]),)


def test_classifier_uses_the_cached_file(pretrained: PretrainedExport, tmp_path: Path) -> None:
    size = load_contract(pretrained.out, "classifier").input_size[0]
    image = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    outputs = run_in_fresh_process(pretrained.out / "classifier" / "1" / "model.pt", image, tmp_path)
    transforms = CLASSIFIER_WEIGHTS.transforms()
    assert_classifier_matches(pretrained.classifier, image, outputs, transforms.mean, transforms.std)


def test_classifier_onnx_uses_the_cached_file(pretrained: PretrainedExport) -> None:
    """model.onnx from the same weights: ResNet-50 through the dynamo exporter."""
    size = load_contract(pretrained.out, "classifier").input_size[0]
    image = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    outputs = run_onnx(pretrained.out / "classifier" / "1" / "model.onnx", image)
    transforms = CLASSIFIER_WEIGHTS.transforms()
    assert_classifier_matches(pretrained.classifier, image, outputs, transforms.mean, transforms.std)


def test_detector_keeps_coco_names_and_the_requested_size(pretrained: PretrainedExport) -> None:
    contract = load_contract(pretrained.out, "detector")
    assert contract.labels == tuple(DETECTOR_WEIGHTS.meta["categories"])
    assert contract.labels[0] == "__background__" and "N/A" in contract.labels
    assert contract.input_size == (DETECTOR_TEST_SIZE, DETECTOR_TEST_SIZE)
    assert contract.parameters["weights"] == "pretrained:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    assert contract.preprocess == "letterbox"


def test_detector_uses_the_cached_file(pretrained: PretrainedExport, tmp_path: Path) -> None:
    scene = torch.from_numpy(make_scene(5, DETECTOR_TEST_SIZE).image).permute(2, 0, 1)[None]
    outputs = run_in_fresh_process(pretrained.out / "detector" / "1" / "model.pt", scene, tmp_path)
    assert_detector_matches(pretrained.detector, scene, outputs)


def test_detector_onnx_answers_what_model_pt_answers(pretrained: PretrainedExport) -> None:
    """model.onnx of torchvision's Faster R-CNN v2 (traced per image, looped over the batch) against model.pt.

    These random weights give ~100 detections per image with scores near 1 from proposals whose
    objectness nearly ties, so ONNX Runtime's last-bit differences can pick another proposal for a box
    (seen: 1 box of 200, IoU 0.89): 95 % of the boxes must match at IoU >= 0.99 (trained weights: all of
    them, tests/service/test_runtimes.py)."""
    scenes = torch.cat(
        [torch.from_numpy(make_scene(seed, DETECTOR_TEST_SIZE).image).permute(2, 0, 1)[None] for seed in (5, 6)]
    )
    names = ("BOXES", "SCORES", "LABELS", "COUNT")
    onnx = run_onnx(pretrained.out / "detector" / "1" / "model.onnx", scenes)
    with torch.no_grad():
        torchscript = load_torchscript(pretrained.out / "detector" / "1" / "model.pt", torch.device("cpu"))(scenes)
    assert_detections_agree(
        {n: t.numpy() for n, t in zip(names, torchscript, strict=True)},
        {n: t.numpy() for n, t in zip(names, onnx, strict=True)},
        min_matched=0.95,
    )


def test_missing_cache_offline_is_a_clear_error(tmp_path: Path) -> None:
    empty_home = tmp_path / "empty_torch_home"
    done = run_export(
        "classifier",
        "--weights",
        "pretrained",
        "--out",
        str(tmp_path / "repo"),
        "--cpu-out",
        str(tmp_path / "cpu"),
        env={"TORCH_HOME": str(empty_home), **OFFLINE},
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(cache_file(empty_home, CLASSIFIER_WEIGHTS.url)) in lines[0]
    assert not (tmp_path / "repo").exists() and not (tmp_path / "cpu").exists()
