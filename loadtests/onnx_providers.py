"""GPU check for the ONNX files: each model.onnx through ONNX Runtime's CUDA and TensorRT providers,
compared with model.pt (TorchScript) on the same device and images, and timed at several batch sizes.

`check_onnx_providers(repository, models, device)` is the entry point for loadtests/gpu_check.py
(it exports with `python -m export`, which writes model.onnx beside every model.pt); it returns a
JSON-ready dict and never raises for a provider that is missing (it is reported as unavailable).
It needs the onnxruntime-gpu wheel (same version as the pinned onnxruntime, which it replaces) and,
for TensorRT, TensorRT's libraries (`pip install tensorrt-cu12`, or NVIDIA's container). On a machine
without CUDA, `--providers CPUExecutionProvider --device cpu` rehearses every step.

    python -m loadtests.onnx_providers --repository model_repository --out loadtests/out/onnx_providers
    python -m loadtests.onnx_providers --device cpu --providers CPUExecutionProvider --duration 0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from service.backends.onnxruntime import ONNX_FILE, session_options
from service.backends.torchscript import TorchScriptModel
from tasks import MODELS

log = logging.getLogger("loadtests.onnx_providers")

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# ONNX Runtime against TorchScript on the same device. TensorRT runs FP32 here (trt_fp16_enable off):
# its kernels and fusions differ from cuDNN's, so it gets the looser bounds gpu_check.py gives CUDA.
TOLERANCES = {
    "PROBS max_abs_diff": 1e-4,
    "MASK mismatch_fraction": 1e-3,
    "COUNT max_abs_diff": 0.0,
    "SCORES max_abs_diff": 1e-3,
    "BOXES max_abs_diff": 0.05,  # pixels, each TorchScript box against the closest same-label ONNX box
}


def provider_options(provider: str, cache_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The provider chain of one session: `provider` first, then what takes the nodes it cannot run."""
    if provider == "TensorrtExecutionProvider":
        trt = {
            "trt_fp16_enable": False,  # FP32: the same answers as CUDA; FP16 needs its own parity bounds
            "trt_engine_cache_enable": True,  # the engine is built once per shape, minutes for the detector
            "trt_engine_cache_path": str(cache_dir),
            "trt_max_workspace_size": 1 << 30,
        }
        return [(provider, trt), ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    if provider == "CUDAExecutionProvider":
        return [(provider, {}), ("CPUExecutionProvider", {})]
    return [(provider, {})]


def compare(model: str, expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each check of `model`'s outputs against its tolerance."""
    values: dict[str, float] = {}
    if model == "classifier":
        values["PROBS max_abs_diff"] = float(np.abs(actual["PROBS"] - expected["PROBS"]).max())
    elif model == "segmenter":
        values["MASK mismatch_fraction"] = float((actual["MASK"] != expected["MASK"]).mean())
    else:
        values["COUNT max_abs_diff"] = float(np.abs(actual["COUNT"] - expected["COUNT"]).max())
        box_diff, score_diff = 0.0, 0.0
        for i, (n,) in enumerate(np.minimum(expected["COUNT"], actual["COUNT"])):
            for j in range(int(n)):
                same = np.flatnonzero(actual["LABELS"][i, :n] == expected["LABELS"][i, j])
                if not len(same):
                    box_diff = float("inf")
                    continue
                diffs = np.abs(actual["BOXES"][i, same] - expected["BOXES"][i, j]).max(axis=1)
                box_diff = max(box_diff, float(diffs.min()))
                score_diff = max(score_diff, float(abs(actual["SCORES"][i, same[diffs.argmin()]] - expected["SCORES"][i, j])))
        values["BOXES max_abs_diff"], values["SCORES max_abs_diff"] = box_diff, score_diff
    return {
        name: {"value": value, "tolerance": TOLERANCES[name], "passed": bool(value <= TOLERANCES[name])}
        for name, value in values.items()
    }


def time_batches(session: ort.InferenceSession, feed: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
    """Images/s and the median batch time of `session` on `feed`, after one unmeasured run."""
    session.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline or not times:
        began = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - began)
    batch = len(next(iter(feed.values())))
    return {"images_per_s": batch * len(times) / sum(times), "batch_ms_p50": 1000 * float(np.median(times))}


def check_onnx_providers(
    repository: Path,
    models: Sequence[str] = MODELS,
    device: str = "cuda",
    providers: Sequence[str] = GPU_PROVIDERS,
    batch_sizes: Sequence[int] = (1, 8),
    duration_s: float = 3.0,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Per model and provider: whether it loaded, which providers ran it, parity with model.pt on `device`,
    images/s of the model alone per batch size. `passed` is false if a check failed on an available provider."""
    cache_dir = cache_dir or repository.parent / "trt_engine_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    available = ort.get_available_providers()
    result: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "tolerances": TOLERANCES,
        "models": {},
    }
    passed = True
    for model in models:
        reference = TorchScriptModel(repository, model, device)
        dims = reference.contract.inputs[0].dims
        images = np.random.default_rng(0).integers(0, 256, (max(batch_sizes), *dims), dtype=np.uint8)
        expected = reference.forward(images)
        entry: dict[str, Any] = {"torchscript": {}, "providers": {}}
        for size in batch_sizes:
            began = time.perf_counter()
            runs = 0
            while time.perf_counter() - began < duration_s or not runs:
                reference.forward(images[:size])
                runs += 1
            entry["torchscript"][size] = {"images_per_s": size * runs / (time.perf_counter() - began)}
        for provider in providers:
            if provider not in available:
                entry["providers"][provider] = {"available": False, "reason": f"not in {available}"}
                continue
            try:
                started = time.perf_counter()
                session = ort.InferenceSession(
                    str(repository / model / reference.version / ONNX_FILE),
                    session_options(1),
                    providers=provider_options(provider, cache_dir / model),
                )
                input_name = session.get_inputs()[0].name
                names = [o.name for o in session.get_outputs()]
                actual = dict(zip(names, session.run(None, {input_name: images}), strict=True))
                checks = compare(model, expected, actual)
                entry["providers"][provider] = {
                    "available": True,
                    "session_providers": session.get_providers(),
                    "first_run_s": time.perf_counter() - started,  # TensorRT: engine build included
                    "parity": checks,
                    "throughput": {
                        size: time_batches(session, {input_name: images[:size]}, duration_s) for size in batch_sizes
                    },
                }
                passed &= all(check["passed"] for check in checks.values())
            except Exception as exc:  # a provider that fails to load or run is reported, the others still run
                log.exception("%s on %s failed", model, provider)
                entry["providers"][provider] = {"available": True, "error": str(exc).splitlines()[0]}
                passed = False
        result["models"][model] = entry
    result["passed"] = passed
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check on an exported repository; write onnx_providers.json; exit 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where model.pt runs")
    parser.add_argument("--providers", default=",".join(GPU_PROVIDERS))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per timed batch size")
    parser.add_argument("--out", type=Path, default=Path("loadtests/out/onnx_providers"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("onnx_providers: error: no CUDA device (use --device cpu --providers CPUExecutionProvider)\n")
        return 1
    result = check_onnx_providers(
        args.repository.resolve(),
        [m for m in args.models.split(",") if m],
        args.device,
        [p for p in args.providers.split(",") if p],
        [int(b) for b in args.batch_sizes.split(",")],
        args.duration,
        args.out.resolve() / "trt_engine_cache",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_providers.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({m: {p: v.get("parity", v) for p, v in e["providers"].items()} for m, e in result["models"].items()}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
