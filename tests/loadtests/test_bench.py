"""The benchmark's one command end to end (tiny durations), and its verdict arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtests import report
from tests.conftest import ROOT


def test_bench_command_writes_table_json_and_plot(model_repository: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "loadtests.bench", "--models", "classifier", "--systems", "handwritten,litserve",
        "--concurrency", "1,2", "--duration", "1", "--warmup", "0.5", "--half-load-duration", "1",
        "--raw-duration", "0.5", "--images", "4", "--out", str(tmp_path), "--note", "test",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVSERVE_MODEL_REPOSITORY": str(model_repository)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    output = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, output
    assert "(c) hand-written" in done.stdout and "(d) litserve" in done.stdout, output

    results = json.loads((tmp_path / "bench.json").read_text())
    (run,) = results["models"]
    assert run["model"] == "classifier" and not run["failed"], output
    assert {r["batch_size"] for r in run["inprocess"] if r["stage"] == "model"} >= {1}
    for system in ("handwritten", "litserve"):
        loads = [l for l in run["loads"] if l["system"] == system]
        assert [l["mode"] for l in loads] == ["closed", "closed", "open"]
        assert all(l["ok"] > 0 and l["errors"] == 0 for l in loads), loads
    assert run["summary"]["systems"]["litserve"]["vs_handwritten"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load(system: str, mode: str, rps: float, p50: float = 10.0, p99: float = 15.0) -> dict[str, Any]:
    return {"system": system, "mode": mode, "concurrency": 4, "throughput_rps": rps, "p50_ms": p50,
            "p99_ms": p99, "errors": 0, "offered_rps": rps if mode == "open" else None}  # fmt: skip


def test_targets_are_judged_against_raw_handwritten_and_half_load_tail() -> None:
    results = {
        "inprocess": [
            {"stage": "model", "batch_size": 1, "images_per_s": 50.0},
            {"stage": "model", "batch_size": 8, "images_per_s": 100.0},
        ],
        "loads": [
            _load("handwritten", "closed", 40.0),
            _load("embedded", "closed", 70.0),
            _load("embedded", "closed", 85.0),
            _load("embedded", "open", 42.0, p50=10.0, p99=25.0),
        ],
    }
    summary = report.summarize(results)
    ours = summary["systems"]["embedded"]
    assert summary["raw_limit_images_per_s"] == 100.0
    assert ours["saturation_rps"] == 85.0 and ours["vs_raw"] == 0.85 and ours["vs_handwritten"] == 85.0 / 40.0
    assert ours["half_load_p99_over_p50"] == 2.5
    assert list(ours["targets"].values()) == ["met", "met", "not measured", "MISSED"]
    assert "targets" not in summary["systems"]["handwritten"]
