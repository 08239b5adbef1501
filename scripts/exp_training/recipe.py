"""One recipe of demo training, timed on 2 threads, with the held-out bars AND the service tests' own criteria.

Behind loadtests/RESULTS.md "Demo training time on this machine" (runs J0-J2). Knobs (environment):
CS/CLR classifier steps/lr (batch 64), NCLS classifier images, SS/SLR/CROP segmenter steps/lr/crop (batch 16),
DS/DLR detector steps/lr (batch 8), NSC scenes; LOAD_CLS/SAVE_CLS, LOAD_SEG/SAVE_SEG reuse a stage's weights.
"seg_test" is tests/service/test_correctness.py's per-image mean class IoU and share of images >= 0.6 on its
32 fresh scenes; "det_recall07" its share of drawn boxes found at IoU >= 0.7 with the right label (score >= 0.5)
on its 320 fresh scenes. Run from the repository root: `.venv/bin/python scripts/exp_training/recipe.py`.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from training.train import train_classifier, train_segmenter, train_detector, StepConfig, seed_everything
from training import evaluate
from training.data import render_classification, render_scenes, train_seeds, eval_seeds
from training.models import build_demo_classifier, encoder_trunk, build_demo_segmenter
from training.shapes import CLASSES
from margins import det_test, seg_test  # the service tests' criteria (this script's folder)
E = os.environ.get
torch.set_num_threads(2); seed_everything(0); dev = torch.device("cpu")
KNOBS = ("CS", "CLR", "NCLS", "SS", "SLR", "CROP", "DS", "DLR", "NSC", "LOAD_CLS", "LOAD_SEG")
out = {k: os.environ[k] for k in KNOBS if k in os.environ}
T = time.perf_counter()
nsc = int(E("NSC", "6400")); ncls = int(E("NCLS", "16000"))
if not E("LOAD_CLS"):
    ctr = render_classification(train_seeds(0, 0, ncls), 64, "c")
str_ = render_scenes(train_seeds(0, 5_000_000, nsc), 128, 1, 4, "s")
sev = render_scenes(eval_seeds(500), 128, 1, 4, "se")
out["data_s"] = round(time.perf_counter() - T, 1)
c = s = None
t = time.perf_counter()
if E("LOAD_CLS"):
    c = build_demo_classifier(len(CLASSES)); c.load_state_dict(torch.load(E("LOAD_CLS")))
else:
    c = train_classifier(ctr, StepConfig(int(E("CS", "1000")), 64, float(E("CLR", "3e-3"))), dev, 0, False)
    out["cls_s"] = round(time.perf_counter() - t, 1)
    cev = render_classification(eval_seeds(500), 64, "ce")
    out["top1"] = round(evaluate.classification_top1(c, cev, dev), 4)
    if E("SAVE_CLS"): torch.save(c.state_dict(), E("SAVE_CLS"))
print(json.dumps(out), flush=True)
t = time.perf_counter()
if E("LOAD_SEG"):
    s = build_demo_segmenter(len(CLASSES) + 1); s.load_state_dict(torch.load(E("LOAD_SEG")))
else:
    s = train_segmenter(str_, StepConfig(int(E("SS", "1000")), 16, float(E("SLR", "2e-3"))), c, dev, 0, False, int(E("CROP", "96")))
    out["seg_s"] = round(time.perf_counter() - t, 1)
    if E("SAVE_SEG"): torch.save(s.state_dict(), E("SAVE_SEG"))
out["miou"] = round(evaluate.segmentation_miou(s, sev, len(CLASSES) + 1, dev), 4)
out["seg_test"] = seg_test(s)
print(json.dumps(out), flush=True)
if int(E("DS", "400")):
    t = time.perf_counter()
    d = train_detector(str_, StepConfig(int(E("DS", "400")), 8, float(E("DLR", "0.02"))), 128, encoder_trunk(s), dev, 0, False)
    out["det_s"] = round(time.perf_counter() - t, 1)
    out["map"] = round(evaluate.detection_map50(d, sev, dev), 4)
    out["det_recall07"] = det_test(d)
out["total_s"] = round(time.perf_counter() - T, 1)
print("RESULT", json.dumps(out), flush=True)
