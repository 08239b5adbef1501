"""loadtests/streams.py end to end with tiny durations: a real uvicorn gateway, every model's rows and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks import MODELS
from tests.conftest import ROOT


def test_streams_bench_prints_a_row_per_model_and_writes_json(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    command = [
        sys.executable,
        "-m",
        "loadtests.streams",
        "--seconds",
        "1",
        "--streams",
        "1,2",
        "--out",
        str(out),
    ]
    command += ["--model-repository", str(model_repository)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for model in MODELS:
        assert f"| {model} |" in done.stdout, done.stdout
    results = json.loads(out.read_text())["results"]
    for model, measured in results.items():
        assert measured["setup"]["streams_per_s"] > 0, model
        assert [step["streams"] for step in measured["lock_step"]] == [1, 2]
        assert all(step["frames_per_s"] > 0 for step in measured["lock_step"]), measured
        assert 0 < measured["flood"]["dropped_share"] < 1, measured["flood"]  # a flood drops, and is answered
