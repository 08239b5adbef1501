"""loadtests/gpu/decode_bench.py's stream-safety probe, on the CPU: both decodes run through it, and neither
changes a freed tensor (there is no queue to race here; on CUDA the probe stalls the stream first)."""

from __future__ import annotations

import torch

from loadtests.gpu.decode_bench import jpegs, letterbox_pipeline, stream_safety


def test_stream_safety_probe_runs_both_decodes() -> None:
    result = stream_safety(torch.device("cpu"), jpegs(80, 60, 3), letterbox_pipeline(64), iterations=3)
    assert result == {"iterations": 3, "stalled": False, "preparer": 0, "torchvision": 0, "passed": True}
