"""The GPU check's CPU rehearsal end to end, as on the GPU image (tritonclient, Ray and PyAV absent):
every step in its own process, the JSON after every step, parity, fp16, decode, the HTTP app over a
model owner; its time limits; and its comparisons on outputs that do and do not match."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from export.wrappers import ClassifierWrapper, script
from loadtests.gpu.parity import (
    BOXES_COMPARED,
    FP16_TOLERANCES,
    TOLERANCES,
    check_parity,
    detector_checks,
    mask_iou,
    unmatched_fraction,
)
from loadtests.gpu.steps import pipeline_settings
from loadtests.gpu_check import DRY_RUN, GPU, passed, plan, run_step, step_timeout, targets, waves
from tasks import MODELS
from tests.conftest import ROOT

GPU_IMAGE = Path(__file__).resolve().parent / "gpu_image"  # its sitecustomize blocks tritonclient, ray, av
CHECK_MODULES = (
    "loadtests.gpu_check", "loadtests.gpu.steps", "loadtests.gpu.http", "loadtests.gpu.decode_bench",
    "service.owner_app", "service.http_workers", "service.backends.owner", "service.backends.pipelined", "service.core.device_decode",
    "export.__main__", "export.precision",
)  # fmt: skip


def _image_env() -> dict[str, str]:
    """This venv as the GPU image sees it: no tritonclient, Ray or PyAV."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(GPU_IMAGE)])}


def test_the_check_s_modules_import_without_tritonclient_ray_or_av() -> None:
    code = (
        "import importlib, sys\n"
        f"sys.path.append({str(ROOT / 'loadtests' / 'gpu' / 'stubs')!r})\n"
        f"for m in {CHECK_MODULES!r}: importlib.import_module(m)\n"
        "import av; assert av.STUB\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tritonclient', 'ray', 'grpc'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_image_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    blocked = subprocess.run(
        [sys.executable, "-c", "import tritonclient"],
        env=_image_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "blocked: not on the GPU image" in blocked.stderr  # the blocker works


def test_a_gpu_run_takes_one_step_at_a_time_and_a_rehearsal_runs_independent_steps_together() -> None:
    assert not GPU.side_by_side and DRY_RUN.side_by_side
    gpu_steps = plan(GPU)
    assert waves(gpu_steps, GPU.side_by_side) == [[name] for name in gpu_steps]
    assert waves(plan(DRY_RUN), DRY_RUN.side_by_side) == [
        ["environment"],
        [*(f"model:{m}" for m in MODELS), "decode"],
        ["http", "onnx"],  # they use the model steps' exports
    ]


def test_dry_run_runs_every_step_as_on_the_gpu_image(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtests.gpu_check", "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(
        command, cwd=ROOT, env=_image_env(), capture_output=True, text=True, timeout=900, check=False
    )
    output = (done.stdout + done.stderr)[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    logs = {
        s["name"]: Path(s["log"]).read_text()[-2000:] for s in results["steps"] if s.get("status") == "failed"
    }
    assert done.returncode == 0, (output, logs)
    assert "FutureWarning" not in done.stderr, output

    assert results["dry_run"] is True and results["passed"] is True
    assert [s["name"] for s in results["steps"]] == [
        "environment",
        *(f"model:{m}" for m in MODELS),
        "http",
        "decode",
        "onnx",
    ]
    assert all(s["status"] == "ok" and s["seconds"] <= s["timeout_s"] for s in results["steps"]), results[
        "steps"
    ]
    assert results["device"]["type"] == "cpu" and results["versions"]["torch"] == torch.__version__
    assert (
        results["packages"]["fastapi"]
        and results["packages"]["torch"]
        and results["unmet_requirements"] == []
    )
    assert results["http_imports_missing"] == {} and results["stubbed_modules"] == ["av"]
    for model in MODELS:
        parity = results["parity"][model]
        assert parity["passed"] is True and parity["images"] == 2 and parity["input_size"] == 64, parity
        assert len(parity["checks"]) >= 2
        for check in parity["checks"]:
            assert check["tolerance"] == TOLERANCES[f"{check['output']} {check['metric']}"]
            assert math.isfinite(check["value"]) and 0 <= check["value"] <= check["tolerance"], check
        fp16 = results["parity_fp16"][model]
        assert fp16["passed"] is True and len(fp16["checks"]) >= 2, fp16
        assert {f"{c['output']} {c['metric']}" for c in fp16["checks"][1:]} <= set(FP16_TOLERANCES)

        export = results["export"][model]
        assert export["command"].startswith(f"python -m export {model} --weights checkpoint")
        assert "--batch-buckets" in export["command"] and export["precision"] == "fp32"
        assert export["input_size"] == 64 and export["model_pt_mib"] > 0 and export["max_batch_size"] == 2
        assert results["export_fp16"][model]["precision"] == "fp16"

        throughput = results["throughput"][model]
        assert [(r["stage"], r["batch_size"]) for r in throughput] == [
            ("model", 1),
            ("model", 2),
            ("pipeline", 2),
        ]
        for row in throughput:
            assert row["batches"] >= 1 and row["images_per_s"] > 0 and row["batch_ms_p50"] > 0, row
        runner = results["runner"][model]
        assert runner["same_outputs"] is True and runner["batch_size"] == 2, runner
        assert runner["plain_images_per_s"] > 0 and runner["pipelined_images_per_s"] > 0
        for precision in ("fp32", "fp16"):
            assert [r["batch_size"] for r in results["sweep"][model][precision]] == [1, 2]
    # Real architectures, not stand-ins: ImageNet's and COCO's class lists, the U-Net's shapes.
    assert [results["export"][m]["labels"] for m in MODELS] == [1000, 91, 6]
    assert results["parity"]["detector"]["detections"] > 0
    assert results["parity"]["segmenter"]["mask_classes"] > 1

    decode = results["decode"]
    assert decode["passed"] and decode["decoded_on_cpu"] == 0 and decode["decoded_on_device"] > 0
    assert decode["stream_safety"] == {
        "iterations": 2, "stalled": False, "preparer": 0, "torchvision": 0, "passed": True,
    }  # fmt: skip
    assert all(r["device_prepare"]["images_per_s"] > 0 for r in decode["rows"])
    http = results["http"]
    assert http["status"] == "ok" and http["stubbed_av"] is True and http["repository"] == "fp16"
    assert http["loads"]["classifier"]["ok"] > 0 and http["loads"]["classifier"]["errors"] == 0
    # The workers sent JPEGs as files and the owner decoded them in its batches (torchvision's CPU decoder here).
    assert http["device_decode"] == "on" and http["decoded"]["classifier"]["device"] > 0, http["decoded"]
    goal = results["targets"]["classify_rps"]  # measured (far from the GPU's target, here)
    assert goal["value"] == http["loads"]["classifier"]["throughput_rps"] > 0 and goal["met"] is False
    # Which processes were busy in the measured window: every role used CPU; no GPU, so no utilization.
    usage = http["loads"]["classifier"]["usage"]
    assert goal["usage"] == usage and usage["window_s"] > 0.5 and usage["gpu_utilization_pct"] is None, usage
    assert set(usage["cpu_cores"]) == set(usage["cpu_ms_per_request"]) == {"owner", "workers", "load_generator"}
    # The owner and the workers used CPU. The load generator's share at the dry run's ~30 requests/s (an fp16
    # model on the CPU) is a few ms over the 2 s window, under psutil's 10 ms tick: 0.0 in 2 of 4 runs here.
    cores = usage["cpu_cores"]
    assert cores["owner"] > 0 and cores["workers"] > 0 and cores["load_generator"] >= 0, usage
    onnx = results["onnx"]  # the fp32 exports' model.onnx through ONNX Runtime (its CPU provider here)
    assert onnx["status"] == "ok" and onnx["passed"] is True and set(onnx["models"]) == set(MODELS), onnx
    for model in MODELS:
        cpu = onnx["models"][model]["providers"]["CPUExecutionProvider"]
        assert cpu["available"] and cpu["session_providers"][0] == "CPUExecutionProvider", cpu
        assert cpu["parity"] and all(check["passed"] for check in cpu["parity"].values()), cpu["parity"]
    combined = (tmp_path / "gpu_check.log").read_text()
    assert all(
        f"===== {n}.log" in combined
        for n in ("environment", "model-detector", "http", "http-owner", "http-servers")
    )


def test_without_cuda_a_real_run_stops_with_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command = [sys.executable, "-m", "loadtests.gpu_check", "--out", str(tmp_path)]
    done = subprocess.run(
        command, cwd=ROOT, env=_image_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith("gpu_check: error: no CUDA device") and done.stderr.count("\n") == 1, (
        done.stderr
    )
    assert "--dry-run" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_a_step_past_its_time_is_stopped_with_its_processes(tmp_path: Path) -> None:
    context = tmp_path / "context.json"
    context.write_text(json.dumps({"dry_run": True, "device": "cpu", "weights": "random", "work": str(tmp_path),
                                   "out": str(tmp_path), "logs": str(tmp_path), "profile": {}}))  # fmt: skip
    started = time.monotonic()
    entry = run_step("environment", context, tmp_path, tmp_path, 0.5, _image_env())
    assert entry["status"] == "timed out" and entry["timeout_s"] == 0 and time.monotonic() - started < 15
    assert Path(entry["log"]).is_file() and not (tmp_path / "environment.json").exists()


def test_a_failed_or_timed_out_step_or_parity_fails_the_run() -> None:
    ok = {"steps": [{"status": "ok"}, {"status": "skipped"}], "parity": {"a": {"passed": True}}}
    assert passed(ok)
    assert not passed(ok | {"steps": [{"status": "timed out"}]})
    assert not passed(ok | {"parity_fp16": {"a": {"passed": False}}})
    assert not passed(ok | {"http": {"status": "failed"}})
    assert not passed(ok | {"decode": {"passed": False}})
    assert not passed(ok | {"runner": {"a": {"same_outputs": False}}})


def _tiny_classifier(seed: int, classes: int = 5) -> ClassifierWrapper:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    return ClassifierWrapper(net, [0.5] * 3, [0.25] * 3).eval()


def test_parity_fails_when_the_scripted_model_differs() -> None:
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    same = check_parity(
        "classifier", _tiny_classifier(0), script(_tiny_classifier(0)), images, warmup_calls=1
    )
    other = check_parity(
        "classifier", _tiny_classifier(0), script(_tiny_classifier(1)), images, warmup_calls=0
    )
    assert same["passed"] and all(c["value"] == 0 for c in same["checks"])
    assert not other["passed"]
    logits = next(c for c in other["checks"] if c["output"] == "logits")
    assert logits["value"] > logits["tolerance"] and not logits["passed"]
    wider = check_parity("classifier", _tiny_classifier(0), script(_tiny_classifier(0, 6)), images, 0)
    assert [(c["output"], c["value"], c["passed"]) for c in wider["checks"]] == [("outputs", 1, False)]


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> list[torch.Tensor]:
    """One image's detector outputs, zero-padded to K = 4 rows."""
    return _detections_k(boxes, scores, labels, 4)


def _detections_k(boxes: list[list[float]], scores: list[float], labels: list[int], k: int) -> list[torch.Tensor]:
    """One image's detector outputs, zero-padded to `k` rows."""
    n = len(boxes)
    padded_boxes, padded_scores, padded_labels = torch.zeros(1, k, 4), torch.zeros(1, k), torch.zeros(1, k)
    padded_boxes[0, :n] = torch.tensor(boxes)
    padded_scores[0, :n] = torch.tensor(scores)
    padded_labels[0, :n] = torch.tensor(labels, dtype=torch.float32)
    return [padded_boxes, padded_scores, padded_labels, torch.tensor([[float(n)]])]


def test_detector_checks_match_boxes_not_rows() -> None:
    eager = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.9], [1, 2])
    swapped = _detections([[5, 5, 20, 20], [0, 0, 10, 10]], [0.9, 0.9], [2, 1])
    shifted = _detections([[0, 0, 10, 11], [5, 5, 20, 20]], [0.9, 0.9], [1, 2])
    relabelled = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.9], [3, 2])
    more = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], [0.9, 0.9, 0.1], [1, 2, 4])
    fewer = _detections([[0, 0, 10, 10]], [0.9], [1])

    def failed(scripted: list[torch.Tensor]) -> set[str]:
        return {c["output"] for c in detector_checks(eager, scripted) if not c["passed"]}

    assert failed(swapped) == set()  # equal scores in either order are the same answer
    assert failed(shifted) == {"BOXES"}
    assert failed(relabelled) == {"BOXES"}  # no same-label box: reported as null, and failed
    assert next(c for c in detector_checks(eager, relabelled) if c["output"] == "BOXES")["value"] is None
    assert failed(more) == {"COUNT"}
    assert failed(fewer) == {"COUNT", "BOXES"}
    # only the best BOXES_COMPARED eager boxes are held to pixels: a changed tail does not fail
    tail = BOXES_COMPARED + 2
    ranked = [[float(i), 0.0, i + 10.0, 10.0] for i in range(tail)]
    scores = [1.0 - i / 100 for i in range(tail)]
    long_eager = _detections_k(ranked, scores, [1] * tail, tail)
    moved_tail = _detections_k([*ranked[:-1], [50.0, 50.0, 90.0, 90.0]], scores, [1] * tail, tail)
    moved_head = _detections_k([[60.0, 60.0, 70.0, 70.0], *ranked[1:]], scores, [1] * tail, tail)
    assert {c["output"] for c in detector_checks(long_eager, moved_tail) if not c["passed"]} == set()
    assert {c["output"] for c in detector_checks(long_eager, moved_head) if not c["passed"]} == {"BOXES"}
    # fp16 against fp32: boxes match by IoU and label, not by row or pixel
    assert unmatched_fraction(eager, swapped) == 0.0 and unmatched_fraction(eager, shifted) == 0.0
    assert unmatched_fraction(eager, relabelled) == 0.5 and unmatched_fraction(eager, fewer) == 0.5


def test_gpu_profile_settings_are_valid(tmp_path: Path) -> None:
    """The H200 run's classifier step died on Settings (max_batch_size 128 > max_ongoing_requests 64),
    which the dry run's batch of 2 never reached: build every model step's settings at the GPU sizes."""
    for model, max_batch in GPU.max_batch.items():
        settings = pipeline_settings(tmp_path, max_batch)
        assert settings.max_batch_size == max_batch, model
        assert settings.max_ongoing_requests >= max_batch, model


def test_gpu_plan_runs_http_before_the_optional_steps() -> None:
    steps = plan(GPU)
    assert steps[:4] == ("environment", "model:classifier", "model:detector", "model:segmenter")
    assert steps.index("http") == 4 and steps[-1] == "model:detector@640"


def test_mask_iou() -> None:
    a = torch.zeros(1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, :2, :2] = 1
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == pytest.approx((12 / 16 + 0.0) / 2)


def test_targets_compare_detect_with_the_detector_alone_at_the_owner_s_batch() -> None:
    sweep = [{"batch_size": b, "images_per_s": 100.0 * b} for b in (1, 4, 8, 16)]
    results = {
        "profile": {"http": {"max_batch": 32}, "max_batch": {"detector": 8}},
        "sweep": {"detector": {"fp16": sweep, "fp32": [{"batch_size": 8, "images_per_s": 1.0}]}},
        "http": {"repository": "fp16", "loads": {"classifier": {"throughput_rps": 5200.0},
                                                   "detector": {"throughput_rps": 600.0}}},
    }  # fmt: skip
    summary = targets(results)
    assert summary["classify_rps"] == {"value": 5200.0, "target": 5000.0, "met": True, "usage": None}
    detect = summary["detect_vs_model"]
    assert (detect["batch_size"], detect["model_images_per_s"], detect["ratio"]) == (8, 800.0, 0.75)
    assert detect["met"] is False and detect["precision"] == "fp16"
    assert targets({"profile": {}}) == {"classify_rps": None, "detect_vs_model": None}


def test_a_model_step_that_stops_while_measuring_leaves_both_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HTTP step serves the model steps' fp16 exports: they come before any measurement, so a model step
    stopped at its limit (or failing) while measuring still leaves them, with the phases it finished."""
    import dataclasses

    from loadtests.gpu import steps

    def stopped(*args: object, **kwargs: object) -> None:
        raise TimeoutError("the step's time limit, as the orchestrator's SIGTERM would end it")

    monkeypatch.setattr(steps, "sweep", stopped)
    monkeypatch.setattr(steps, "_partial_file", tmp_path / "partial.json")
    ctx = steps.Context(
        dry_run=True, device="cpu", weights="random", work=str(tmp_path), out=str(tmp_path), logs=str(tmp_path),
        profile=dataclasses.asdict(DRY_RUN),
    )  # fmt: skip
    with pytest.raises(TimeoutError):
        steps.step_model(ctx, "classifier", DRY_RUN.sizes["classifier"])
    for precision in ("fp32", "fp16"):
        exported = ctx.repository(precision, "classifier", 64) / "classifier" / "1" / "model.pt"
        assert exported.is_file(), precision
    partial = json.loads((tmp_path / "partial.json").read_text())
    assert partial["partial"] is True
    assert list(partial["phase_s"]) == ["export", "export_fp16", "parity", "parity_fp16"]
    assert partial["parity"]["passed"] and partial["parity_fp16"]["passed"]


def test_the_steps_before_http_leave_it_its_whole_limit() -> None:
    import dataclasses

    profile = dataclasses.replace(GPU, steps=plan(GPU))
    http = GPU.timeouts["http"]  # 150 s, and 5 s for each of two stops
    assert step_timeout("model:classifier", profile, 450) == GPU.timeouts["model"]  # plenty: the kind's limit
    assert step_timeout("model:segmenter", profile, 240) == 240 - http - 10  # short: HTTP keeps its 150 s
    assert step_timeout("model:segmenter", profile, 170) == 10  # the least a step gets (it exports first)
    assert step_timeout("http", profile, 140) == 135  # HTTP itself, and the steps after it: what is left
    assert step_timeout("decode", profile, 240) == GPU.timeouts["decode"]
    assert step_timeout("model:detector@640", profile, 60) == 55
