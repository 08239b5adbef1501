"""The GPU check's steps, each run in its own process by loadtests/gpu_check.py (which bounds its time):

    python -m loadtests.gpu.steps STEP CONTEXT.json RESULT.json

A step reads the run's context (device, profile, directories) and writes one JSON document. Steps:
`environment` (versions, packages, the device), `model:<name>[@<px>]` (export fp32 and fp16, parity,
throughput), `decode` (JPEG decode on the device against Pillow), `http` (the Ray-free app under load,
loadtests/gpu/http.py) and `onnx` (ONNX Runtime's providers on the fp32 exports' model.onnx).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("loadtests.gpu.steps")
# Modules the check must never import: they are not on the GPU image (tests/loadtests/test_gpu_check.py
# runs every step with them blocked).
FORBIDDEN_MODULES = ("tritonclient", "ray")
# The CUDA runner against the plain one, same model and batch: max abs difference of any output.
RUNNER_TOLERANCE = 1e-4
# Modules the HTTP step's servers import; their absence is found in the environment step, in seconds.
HTTP_MODULES = (
    "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "multipart", "msgpack", "pycocotools",
    "shapely", "contourpy", "supervision", "opentelemetry.trace", "prometheus_client", "httpx",
)  # fmt: skip


@dataclass(frozen=True)
class Context:
    """What every step of one run shares (written by the orchestrator as CONTEXT.json)."""

    dry_run: bool
    device: str  # cuda | cpu
    weights: str  # random | pretrained
    work: str  # scratch directory: checkpoints, exported repositories
    out: str  # the run's output directory
    logs: str  # where steps write the logs of processes they start (<step>-<what>.log)
    profile: dict[str, Any]

    def repository(self, precision: str, model: str, size: int | None) -> Path:
        """Where `model` is exported at `precision` (one repository per precision and extra input size)."""
        extra = f"-{size}px" if size and size != self.profile["sizes"].get(model) else ""
        return Path(self.work) / "repositories" / f"{precision}{extra}"


# --- environment --------------------------------------------------------------------------------


def package_versions(names: list[str] | None = None) -> dict[str, str | None]:
    """Installed versions (None: not installed) of the carried wheels and the image's packages we use."""
    root = Path(__file__).resolve().parent
    pins = [line.partition("#")[0].strip() for line in (root / "wheels.txt").read_text().splitlines()]
    carried = [pin.split("==")[0] for pin in pins if pin]
    wanted = names or sorted({*carried, "torch", "torchvision", "numpy", "pillow", "onnxruntime", "protobuf",
                              "anyio", "h11", "click", "httpx", "msgpack", "contourpy", "scipy", "prometheus-client"})  # fmt: skip
    versions: dict[str, str | None] = {}
    for name in wanted:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def unmet_requirements() -> list[str]:
    """Requires-Dist of the carried wheels that what is installed here does not satisfy."""
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent
    problems = []
    for line in (root / "wheels.txt").read_text().splitlines():
        pin = line.partition("#")[0].strip()
        if not pin:
            continue
        name = pin.split("==")[0]
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{pin}: not installed")
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                if requirement.name != "av":  # stubbed (loadtests/gpu/stubs/)
                    problems.append(f"{name} needs {text}: not installed")
                continue
            if not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {text}: {have} is installed")
    return problems


def step_environment(ctx: Context) -> dict[str, Any]:
    """The device, versions and packages, and whether the HTTP step's imports will work."""
    import torch
    import torchvision

    device = torch.device(ctx.device)
    info: dict[str, Any] = {"type": device.type, "cpus": os.cpu_count(), "processor": platform.processor()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
        a = torch.randn(1024, 1024, device=device)
        torch.cuda.synchronize()
        info["matmul_ok"] = bool(torch.isfinite(a @ a).all())
    else:
        info["name"] = platform.processor() or platform.machine()
    missing = {}
    for module in HTTP_MODULES:
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - reported, the http step is then skipped
            missing[module] = f"{type(exc).__name__}: {exc}"
    return {
        "device": info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
        },
        "packages": package_versions(),
        "unmet_requirements": unmet_requirements(),
        "http_imports_missing": missing,
        "forbidden_imported": sorted(m for m in FORBIDDEN_MODULES if m in sys.modules),
    }


# --- models -------------------------------------------------------------------------------------


def random_checkpoint(model: str, work: Path, input_size: int | None) -> Any:
    """A seeded random state dict of `model`'s architecture, as a `--weights checkpoint` source."""
    import torch
    from torch import nn
    from torchvision.models import ResNet50_Weights, resnet50
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

    from export.sources import SourceOptions
    from loadtests.gpu.parity import SEED
    from tasks import TASKS
    from training.models import build_demo_segmenter
    from training.shapes import CLASSES

    torch.manual_seed(SEED)
    module: nn.Module
    if model == "classifier":
        arch, labels = "resnet50", ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
        module = resnet50(weights=None, num_classes=len(labels))
    elif model == "detector":
        arch, labels = (
            "fasterrcnn_resnet50_fpn_v2",
            FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"],
        )
        module = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=len(labels))
    else:
        arch, labels = "demo", [TASKS[model].background, *CLASSES]
        module = build_demo_segmenter(len(labels))
        with torch.no_grad():
            # A fresh U-Net's head bias picks one class everywhere (as in tests/export): let pixels speak.
            module.head.bias.zero_()
            module.head.weight.mul_(100)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, classes = work / f"{model}.pt", work / f"{model}-classes.txt"
    torch.save(module.state_dict(), checkpoint)
    classes.write_text("".join(f"{label}\n" for label in labels))
    return SourceOptions(
        weights="checkpoint", arch=arch, checkpoint=checkpoint, classes=classes, input_size=input_size
    )


def weight_source(model: str, weights: str, work: Path, input_size: int | None) -> Any:
    """`model`'s weights: a random checkpoint, or torchvision's pretrained files (it has no U-Net)."""
    from export.sources import SourceOptions

    if weights == "pretrained" and model != "segmenter":
        return SourceOptions(weights="pretrained", input_size=input_size)
    return random_checkpoint(model, work, input_size)


def export_argv(model: str, source: Any, repository: Path, max_batch_size: int, precision: str) -> list[str]:
    """`python -m export` arguments that export `model` from `source` into `repository`, at batch buckets."""
    argv = [
        model, "--weights", source.weights, "--out", str(repository),
        "--cpu-out", str(repository.with_name(f"{repository.name}-cpu")),
        "--max-batch-size", str(max_batch_size), "--batch-buckets",
    ]  # fmt: skip
    if precision != "fp32":
        argv += ["--precision", precision, "--no-onnx"]  # the onnx step runs the fp32 export's model.onnx
    if source.weights == "checkpoint":
        argv += [
            "--arch",
            source.arch,
            "--checkpoint",
            str(source.checkpoint),
            "--classes",
            str(source.classes),
        ]
    if source.input_size:
        argv += ["--input-size", str(source.input_size)]
    return argv


def export_model(
    model: str, source: Any, repository: Path, max_batch_size: int, precision: str
) -> dict[str, Any]:
    """Run the export CLI for one model; say what it wrote."""
    from export.__main__ import main as export_main
    from service.contract import load_contract

    argv = export_argv(model, source, repository, max_batch_size, precision)
    started = time.monotonic()
    if export_main(argv) != 0:
        raise RuntimeError(f"`python -m export {' '.join(argv)}` failed (its error is in the step's log)")
    contract = load_contract(repository, model)
    return {
        "command": f"python -m export {' '.join(argv)}",
        "weights": contract.parameters["weights"],
        "precision": contract.parameters.get("precision", "fp32"),
        "input_size": contract.inputs[0].dims[-1],
        "labels": len(contract.labels),
        "max_batch_size": contract.max_batch_size,
        "model_pt_mib": round((repository / model / "1" / "model.pt").stat().st_size / 2**20, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep(
    module: Any, input_size: int, sizes: list[int], duration_s: float, warmup_calls: int, device: Any
) -> list[dict[str, Any]]:
    """The model alone on a device-resident uint8 batch at each size: images/s and the median batch time
    (transfers excluded: that is the runner's job, measured in the pipeline and HTTP figures)."""
    import torch

    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        batch = torch.randint(
            0, 256, (size, 3, input_size, input_size), dtype=torch.uint8, generator=generator
        )
        batch = batch.to(device)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup_calls):
                module(batch)
            _synchronize(device)
            deadline = time.perf_counter() + duration_s
            while time.perf_counter() < deadline or not times:
                began = time.perf_counter()
                module(batch)
                _synchronize(device)
                times.append(time.perf_counter() - began)
        rows.append({
            "batch_size": size,
            "batches": len(times),
            "images_per_s": round(size * len(times) / sum(times), 1),
            "batch_ms_p50": round(1000 * statistics.median(times), 2),
        })  # fmt: skip
    return rows


def pipeline_settings(repository: Path, max_batch: int) -> Any:
    """The gateway's settings for a model step's pipeline: batches up to `max_batch`, and as many requests
    in flight (Settings refuses fewer: the H200 run's classifier step failed on 128 > 64)."""
    from service.settings import Settings

    return Settings(
        model_repository=repository,
        max_batch_size=max_batch,
        max_ongoing_requests=max(Settings.model_fields["max_ongoing_requests"].default, max_batch),
    )


def measure_pipeline_rows(
    model: str, repository: Path, device: Any, sizes: list[int], profile: dict[str, Any]
) -> list[dict[str, Any]]:
    """Images/s of the gateway's model runner (copies in and out) at each size, and of decode → preprocess
    → model → postprocess in one process at the largest (the existing in-process figures)."""
    from loadtests.baselines.pipeline import ModelPipeline
    from loadtests.images import make_image_mix
    from loadtests.inprocess import measure_model, measure_pipeline
    from service.backends.torchscript import TorchScriptModel
    from service.core.pipeline import TaskPipeline

    settings = pipeline_settings(repository, max(sizes))
    pipeline = ModelPipeline(
        TaskPipeline.load(settings, model), TorchScriptModel(repository, model, device.type)
    )
    images = make_image_mix(profile["images"], tuple(tuple(s) for s in profile["image_sizes"]))
    prepared = [pipeline.prepare(image.data)[0] for image in images]
    for size in sizes:
        for _ in range(profile["warmup_calls"]):
            pipeline.infer([prepared[i % len(prepared)] for i in range(size)])
    results = measure_model(pipeline, prepared, sizes, profile["duration_s"])
    results.append(measure_pipeline(pipeline, images, sizes[-1], profile["duration_s"]))
    return [dataclasses.asdict(r) for r in results]


def measure_runner(
    model: str, repository: Path, device: Any, bucket: int, duration_s: float, warmup_calls: int
) -> dict[str, Any]:
    """The CUDA runner (service/backends/pipelined.py, two batches in flight) against the plain one
    (TorchScriptModel.infer, one batch at a time) at the largest bucket: the same outputs, and images/s
    of each with host-to-device and device-to-host copies included."""
    import numpy as np
    import torch

    from loadtests.gpu.parity import detector_checks
    from service.backends.pipelined import PipelinedRunner
    from service.backends.torchscript import TorchScriptModel

    plain = TorchScriptModel(repository, model, device.type)
    runner = PipelinedRunner(plain, (bucket,))
    dims = plain.contract.inputs[0].dims
    images = list(np.random.default_rng(0).integers(0, 256, (bucket, *dims), dtype=np.uint8))
    for _ in range(warmup_calls):
        expected, got = plain.infer(images), runner.infer(images)
    if model == "detector":  # equal-score boxes may swap rows: match boxes, as the parity check does
        names = [spec.name for spec in plain.contract.outputs]
        stacked = [
            [torch.from_numpy(np.stack([o[n] for o in outs])).float() for n in names]
            for outs in (expected, got)
        ]
        same = all(check["passed"] for check in detector_checks(*stacked))
        max_diff = None
    else:
        max_diff = max(
            float(np.abs(g[name].astype(np.float64) - e[name].astype(np.float64)).max())
            for g, e in zip(got, expected, strict=True)
            for name in e
        )
        same = max_diff <= RUNNER_TOLERANCE

    def plain_rate() -> float:
        count, deadline = 0, time.perf_counter() + duration_s
        began = time.perf_counter()
        while time.perf_counter() < deadline or not count:
            plain.infer(images)
            count += 1
        return bucket * count / (time.perf_counter() - began)

    def pipelined_rate() -> float:
        count, deadline = 0, time.perf_counter() + duration_s
        began = time.perf_counter()
        launched = runner.launch(images)
        while time.perf_counter() < deadline or not count:
            following = runner.launch(images)  # the next batch is queued before the last one is read
            runner.finish(launched)
            launched, count = following, count + 1
        runner.finish(launched)
        return bucket * (count + 1) / (time.perf_counter() - began)

    return {
        "batch_size": bucket,
        "max_abs_diff": max_diff,
        "same_outputs": same,
        "plain_images_per_s": round(plain_rate(), 1),
        "pipelined_images_per_s": round(pipelined_rate(), 1),
    }


def step_model(ctx: Context, model: str, size: int | None) -> dict[str, Any]:
    """Export `model` (fp32, and fp16 when the profile says), check both, measure both."""
    import torch

    from export.sources import load_specs
    from loadtests.gpu.parity import check_parity, fp16_parity, parity_images
    from service.backends.torchscript import load_torchscript
    from service.buckets import buckets_up_to

    profile = ctx.profile
    device = torch.device(ctx.device)
    if profile.get("cpu_threads"):
        torch.set_num_threads(profile["cpu_threads"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes (buckets): pick the fastest kernels
    max_batch = profile["max_batch"][model]
    sizes = list(buckets_up_to(max_batch))
    source = weight_source(model, ctx.weights, Path(ctx.work) / "weights", size)
    result: dict[str, Any] = {"model": model, "batch_sizes": sizes, "phase_s": {}}
    clock = [time.monotonic()]

    def phase(name: str) -> None:  # where the step's time went, in the JSON and the step's log
        now = time.monotonic()
        result["phase_s"][name] = round(now - clock[0], 1)
        log.info("%s %s: %.1fs", model, name, now - clock[0])
        clock[0] = now
        save_partial(result)  # a step stopped at its time limit still reports the phases it finished

    # The exports first (the HTTP step serves them, even if this step's measurements run out of time),
    # then the checks, then the figures in the order the targets need them: the model alone (/detect's
    # reference), the CUDA runner, the gateway's runner and the in-process pipeline.
    fp16 = bool(profile.get("fp16"))
    fp32_repo, fp16_repo = ctx.repository("fp32", model, size), ctx.repository("fp16", model, size)
    result["export"] = export_model(model, source, fp32_repo, max_batch, "fp32")
    phase("export")
    if fp16:
        result["export_fp16"] = export_model(model, source, fp16_repo, max_batch, "fp16")
        phase("export_fp16")
    spec = load_specs([model], source)[0]  # the same weights, as the eager model the export scripted
    input_size = spec.input_size
    images = parity_images(model, input_size, profile["parity_batch"]).to(device)
    scripted = load_torchscript(fp32_repo / model / "1" / "model.pt", device)
    result["parity"] = check_parity(model, spec.module.to(device), scripted, images, profile["warmup_calls"])
    del spec
    phase("parity")
    half = None
    if fp16:
        half = load_torchscript(fp16_repo / model / "1" / "model.pt", device)
        for _ in range(profile["warmup_calls"]):
            with torch.inference_mode():
                half(images)
        result["parity_fp16"] = fp16_parity(model, scripted, half, images)
        phase("parity_fp16")
    result["sweep"] = {
        "fp32": sweep(scripted, input_size, sizes, profile["sweep_s"], profile["warmup_calls"], device)
    }
    phase("sweep")
    if half is not None:
        result["sweep"]["fp16"] = sweep(
            half, input_size, sizes, profile["sweep_s"], profile["warmup_calls"], device
        )
        phase("sweep_fp16")
    result["runner"] = measure_runner(
        model, fp32_repo, device, sizes[-1], profile["duration_s"], profile["warmup_calls"]
    )
    phase("runner")
    result["throughput"] = measure_pipeline_rows(model, fp32_repo, device, sizes, profile)
    phase("throughput")
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


# --- decode ---------------------------------------------------------------------------------------


def step_decode(ctx: Context) -> dict[str, Any]:
    """JPEG decode and letterbox: batched on the device (service/core/device_decode.py) against the
    CPU path (Pillow, one image at a time), images/s and the pixels' difference."""
    import torch

    from loadtests.gpu.decode_bench import measure_decode

    if ctx.profile.get("cpu_threads"):
        torch.set_num_threads(ctx.profile["cpu_threads"])
    return measure_decode(torch.device(ctx.device), ctx.profile["decode"])


# --- HTTP ---------------------------------------------------------------------------------------


def step_http(ctx: Context) -> dict[str, Any]:
    """The Ray-free app: uvicorn processes feeding one model owner on the device, under load."""
    from loadtests.gpu.http import run_http_bench

    # This module's own save_partial: the step runs it as __main__, where `_partial_file` is set.
    return run_http_bench(ctx, save_partial)


# --- ONNX Runtime (hook) ------------------------------------------------------------------------


def step_onnx(ctx: Context) -> dict[str, Any]:
    """ONNX Runtime on the device: every model.onnx the model steps' fp32 exports wrote, run by ONNX Runtime's
    CUDA and TensorRT providers (the CPU provider in a dry run), checked against the same export's model.pt
    on the device and timed beside it (`loadtests.onnx_providers.check_onnx_providers`)."""
    from loadtests.onnx_providers import GPU_PROVIDERS, check_onnx_providers
    from tasks import MODELS

    repository = ctx.repository("fp32", "", None)
    models = [m for m in MODELS if (repository / m / "1" / "model.onnx").is_file()]
    if not models:
        return {"status": "skipped", "reason": f"no model step exported a model.onnx into {repository}"}
    providers = GPU_PROVIDERS if ctx.device == "cuda" else ("CPUExecutionProvider",)
    sizes = (1, 2) if ctx.dry_run else (1, 8)
    result = check_onnx_providers(
        repository, models, ctx.device, providers, batch_sizes=sizes, duration_s=0.2 if ctx.dry_run else 1.0
    )
    return {"status": "ok", **result}


_partial_file: Path | None = None  # RESULT.json of the step this process runs


def save_partial(result: dict[str, Any]) -> None:
    """Write what the step has so far (marked partial): the orchestrator keeps it if the step is stopped."""
    if _partial_file is not None:
        _partial_file.write_text(json.dumps(result | {"partial": True}, indent=2) + "\n")


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "environment": step_environment,
    "model": step_model,
    "decode": step_decode,
    "http": step_http,
    "onnx": step_onnx,
}


def run_step(name: str, ctx: Context) -> dict[str, Any]:
    """Run the step called `name` (`model:<model>[@<px>]` for a model)."""
    kind, _, argument = name.partition(":")
    if kind == "model":
        model, _, px = argument.partition("@")
        return step_model(ctx, model, int(px) if px else ctx.profile["sizes"].get(model))
    return STEPS[kind](ctx)


def main(argv: list[str]) -> int:
    """python -m loadtests.gpu.steps STEP CONTEXT.json RESULT.json"""
    import warnings

    name, context_file, result_file = argv
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
    global _partial_file
    _partial_file = Path(result_file)
    ctx = Context(**json.loads(Path(context_file).read_text()))
    started = time.monotonic()
    result = run_step(name, ctx)
    result["forbidden_imported"] = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
    result["seconds"] = round(time.monotonic() - started, 1)
    Path(result_file).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
