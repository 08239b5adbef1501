"""The service tests' own criteria, measured on a trained output directory (default artifacts/demo).

"seg_test": tests/service/test_correctness.py's per-image mean class IoU and share of images >= 0.6 on its
32 fresh scenes (bars 0.8 / 0.85); "det_recall07": its share of drawn boxes found at IoU >= 0.7 with the
right label (score >= 0.5) on its 320 fresh scenes (bar 0.9). The same measures as recipe.py, without training.
Run from the repository root: `.venv/bin/python scripts/exp_training/margins.py [DIR]`.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch
from torchvision.ops import box_iou

from support.seeds import fresh_seeds
from training.data import normalise, to_unit_float
from training.models import build_demo_detector, build_demo_segmenter
from training.shapes import CLASSES, make_scene


def seg_test(model):
    model.eval()
    ious = []
    for seed in fresh_seeds(32, offset=200):
        scene = make_scene(seed, 128, 1, 4)
        with torch.no_grad():
            image = normalise(torch.from_numpy(scene.image).permute(2, 0, 1)[None])
            pred = model(image).argmax(1)[0].numpy()
        truth = scene.mask
        classes = (set(np.unique(truth)) | set(np.unique(pred))) - {0}
        per_class = [((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum() for c in classes]
        ious.append(np.mean(per_class) if classes else 1.0)
    return round(float(np.mean(ious)), 3), round(float(np.mean(np.array(ious) >= 0.6)), 3)


def det_test(model):
    model.eval()
    drawn = found = 0
    seeds = list(fresh_seeds(320, offset=1000))
    for i in range(0, 320, 32):
        scenes = [make_scene(s, 128, 1, 4) for s in seeds[i : i + 32]]
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
        with torch.no_grad():
            outputs = model(list(to_unit_float(images)))
        for scene, out in zip(scenes, outputs, strict=True):
            keep = out["scores"] >= 0.5
            for box, label in zip(torch.as_tensor(scene.boxes, dtype=torch.float32), scene.labels, strict=True):
                drawn += 1
                match = keep & (out["labels"] == int(label))
                if match.any() and box_iou(box[None], out["boxes"][match]).max() >= 0.7:
                    found += 1
    return round(found / drawn, 3)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/demo")
    torch.set_num_threads(2)
    segmenter = build_demo_segmenter(len(CLASSES) + 1)
    segmenter.load_state_dict(torch.load(root / "segmenter.pt"))
    detector = build_demo_detector(len(CLASSES), 128)
    detector.load_state_dict(torch.load(root / "detector.pt"))
    report = json.loads((root / "report.json").read_text())
    print(json.dumps({
        "dir": str(root),
        "key": report.get("training_key"),
        "held_out": {name: m["value"] for name, m in report["models"].items()},
        "seg_test": seg_test(segmenter),
        "det_recall07": det_test(detector),
    }))
