"""`python -m loadtests.lifecycle` runs end to end (tiny windows): every configuration measured, the control
beside the baseline, and in an open loop with idle time the shadow's comparisons really run."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests import lifecycle


def test_the_lifecycle_bench_measures_every_configuration_with_a_control(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "lifecycle.json"
    args = ["--model-repository", str(model_repository), "--rounds", "1", "--duration", "3", "--warmup", "0.5"]
    assert lifecycle.main([*args, "--rate", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert list(summary) == list(lifecycle.CONFIGS) and "control: no candidate again" in summary
    assert result["shadow_max_utilisation"] == 0.5  # the gateway's default: comparisons in idle time
    for name, row in summary.items():
        assert row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"], (name, row)
    every = summary["shadow 100 %"]
    assert every["compared_requests"] > 0, every  # 5 requests/s leave idle time: comparisons ran
    assert 0 < every["top1_agreement"] < 1, every  # version 2 swaps two classes: it disagrees on some images
    assert summary["control: no candidate again"]["compared_requests"] == 0
    assert "| control: no candidate again |" in lifecycle.markdown(result)
