"""The agreement measures on hand-made outputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.agreement import MEASURES, box_f1, box_iou, classification, compare, detection, mask_iou, segmentation


def probs(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_top1_agreement_and_score_drift() -> None:
    same = classification({"PROBS": probs(0.7, 0.2, 0.1)}, {"PROBS": probs(0.6, 0.3, 0.1)})
    assert same["top1_agreement"] == 1.0 and same["score_drift"] == pytest.approx(0.1, abs=1e-6)
    other = classification({"PROBS": probs(0.7, 0.2, 0.1)}, {"PROBS": probs(0.1, 0.8, 0.1)})
    assert other["top1_agreement"] == 0.0 and other["score_drift"] == pytest.approx(0.6, abs=1e-6)


def detections(rows: list[tuple[list[float], float, int]], k: int = 5) -> dict[str, np.ndarray]:
    boxes, scores, labels = np.zeros((k, 4), np.float32), np.zeros(k, np.float32), np.zeros(k, np.int64)
    for i, (box, score, label) in enumerate(rows):
        boxes[i], scores[i], labels[i] = box, score, label
    return {"BOXES": boxes, "SCORES": scores, "LABELS": labels, "COUNT": np.array([len(rows)], np.int32)}


def test_box_iou() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert iou.shape == (1, 3)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])


def test_box_f1_counts_matches_at_iou_half_of_the_same_label() -> None:
    current = detections([([0, 0, 10, 10], 0.9, 1), ([20, 20, 40, 40], 0.8, 2)])
    same = detection(current, current)
    assert same == {"box_f1": 1.0, "count_drift": 0.0}
    # one box shifted past IoU 0.5, one with another label, one extra: no match at all
    moved = detections([([6, 0, 16, 10], 0.9, 1), ([20, 20, 40, 40], 0.8, 3), ([50, 50, 60, 60], 0.7, 1)])
    assert detection(current, moved) == {"box_f1": 0.0, "count_drift": 1.0}
    # one of two found, plus one extra: 2 * 1 / (2 + 2)
    half = detections([([1, 0, 11, 10], 0.9, 1), ([50, 50, 60, 60], 0.7, 1)])
    assert detection(current, half) == {"box_f1": pytest.approx(0.5), "count_drift": 0.0}


def test_low_scores_and_rows_past_count_do_not_count() -> None:
    current = detections([([0, 0, 10, 10], 0.9, 1)])
    weak = detections([([0, 0, 10, 10], 0.3, 1)])
    assert detection(current, weak) == {"box_f1": 0.0, "count_drift": 1.0}
    padded = detections([([0, 0, 10, 10], 0.9, 1)])
    padded["BOXES"][1], padded["SCORES"][1] = [30, 30, 40, 40], 0.99  # past COUNT: padding
    assert detection(current, padded)["box_f1"] == 1.0
    empty = detections([])
    assert detection(empty, empty) == {"box_f1": 1.0, "count_drift": 0.0}


def test_greedy_matching_takes_each_truth_once() -> None:
    truth = (np.array([[0, 0, 10, 10]], float), np.array([1]))
    found = (np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float), np.array([1, 1]))
    assert box_f1(truth, found) == pytest.approx(2 * 1 / 3)


def test_mean_mask_iou() -> None:
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    assert mask_iou(a, b) == 1.0
    a[:2, :2] = 1  # 4 pixels of class 1
    b[:2, :1] = 1  # 2 of them
    b[3, 3] = 2  # class 2 only in b
    assert mask_iou(a, b) == pytest.approx((2 / 4 + 0.0) / 2)
    assert segmentation({"MASK": a}, {"MASK": a}) == {"mask_iou": 1.0}
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((2, 2), np.uint8))


def test_compare_names_every_measure_of_its_task() -> None:
    outputs = {
        "classification": {"PROBS": probs(0.5, 0.5)},
        "detection": detections([([0, 0, 10, 10], 0.9, 1)]),
        "segmentation": {"MASK": np.ones((3, 3), np.uint8)},
    }
    assert set(MEASURES) == set(outputs)
    for task, out in outputs.items():
        assert tuple(compare(task, out, out)) == MEASURES[task]
    assert compare("keypoints", {}, {}) == {}
