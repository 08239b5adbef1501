"""The GPU check's ONNX part rehearsed on the CPU: every step of `check_onnx_providers`, CPU provider."""

from __future__ import annotations

from pathlib import Path

from loadtests.onnx_providers import check_onnx_providers
from tasks import MODELS


def test_cpu_rehearsal_checks_every_model(model_repository: Path, tmp_path: Path) -> None:
    result = check_onnx_providers(
        model_repository, MODELS, "cpu", ["CPUExecutionProvider", "NoSuchExecutionProvider"], (1, 2), 0.05,
        tmp_path / "cache",
    )  # fmt: skip
    assert result["passed"], result
    for model in MODELS:
        providers = result["models"][model]["providers"]
        assert providers["NoSuchExecutionProvider"]["available"] is False
        cpu = providers["CPUExecutionProvider"]
        assert cpu["session_providers"] == ["CPUExecutionProvider"]
        assert cpu["parity"] and all(check["passed"] for check in cpu["parity"].values())
        assert set(cpu["throughput"]) == {1, 2} and all(t["images_per_s"] > 0 for t in cpu["throughput"].values())
