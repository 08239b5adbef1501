"""GPU check: export the three models with `python -m export`, check eager vs TorchScript on CUDA,
measure throughput, and write one JSON file.

Models: torchvision's ResNet-50 classifier and Faster R-CNN ResNet-50-FPN v2 detector, and the
project's U-Net segmenter. Weights are random (seeded; saved as checkpoints and exported with
`--weights checkpoint`) unless --weights pretrained, which reads torchvision's files from a filled
$TORCH_HOME cache; torchvision has no U-Net, so the segmenter always has random weights.
For each model: the reloaded model.pt is compared with its eager model on the same device (max
abs diff per output against a tolerance), then images/s is measured in process at batch sizes
1..N (the model alone, and decode → preprocess → model → postprocess at N), and optionally
through the gateway (`python -m loadtests.bench`, embedded backend, CVSERVE_DEVICE=cuda).
Writes DIR/gpu_check.json (device, torch/CUDA versions, parity, throughput); exits 1 if a parity
check or the gateway bench failed. Sized to finish within 8 minutes on one GPU: --budget (450 s)
caps the whole run, and the bench gets what is left.

    bash loadtests/gpu_check.sh --out loadtests/out/gpu_check     # on a CUDA machine
    bash loadtests/gpu_check.sh --dry-run --out /tmp/gpu_check    # CPU rehearsal of every step, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

from export.__main__ import main as export_main
from export.sources import SourceOptions, load_specs
from loadtests.baselines.pipeline import ModelPipeline
from loadtests.bench import batch_sizes
from loadtests.images import DEFAULT_SIZES, EncodedImage, make_image_mix
from loadtests.inprocess import measure_model, measure_pipeline
from service.backends.torchscript import TorchScriptModel, load_torchscript
from service.contract import load_contract
from service.core.pipeline import TaskPipeline
from service.settings import Settings
from tasks import MODELS, TASKS
from training.models import build_demo_segmenter
from training.shapes import CLASSES, make_scene

log = logging.getLogger("loadtests.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = "gpu_check.json"
SEED = 0
# What "the same output" means, per check. Eager and TorchScript run the same kernels, but on CUDA
# the scripted graph's fused elementwise ops may round differently; these leave room for that only.
TOLERANCES = {
    "outputs mismatched_tensors": 0,  # outputs whose shape or dtype differ (then nothing else is compared)
    "PROBS max_abs_diff": 1e-4,  # softmax probabilities
    "logits max_rel_diff": 1e-3,  # max |diff| / max |eager logit|
    "COUNT max_abs_diff": 0.0,  # detections per image
    "SCORES max_abs_diff": 1e-3,
    "BOXES max_abs_diff": 0.05,  # pixels, each eager box against its closest same-label box
    "MASK mismatch_fraction": 1e-3,  # pixels whose class differs (argmax ties)
}
# The gateway bench: its quick mode, embedded backend only. Its in-process figures are measured on
# the CPU, where the 800 px detector alone would take minutes at batch 16: the detector is left out
# by default.
BENCH_ARGS = ("--quick", "--systems", "embedded")
BENCH_MIN_S = 90.0  # the bench is skipped when less of the budget is left
BENCH_STOP_S = 45.0  # an interrupted bench's time to stop its servers (each gets 30 s)


class CheckError(Exception):
    """A step that cannot go on; the message is the one line the command prints."""


@dataclass(frozen=True)
class Profile:
    """How big and how long: the GPU run, or the CPU rehearsal of every step (--dry-run)."""

    sizes: dict[str, int | None]  # input side per model; None: the export's default for the weights
    max_batch_size: int
    parity_batch: int
    duration_s: float  # measured seconds per batch size
    warmup_calls: int  # calls before comparing or measuring (TorchScript optimises after profiling runs)
    images: int
    image_sizes: tuple[tuple[int, int], ...]
    bench_models: tuple[str, ...]
    budget_s: float
    cpu_threads: int | None = None  # torch intra-op threads; None: torch's default


GPU = Profile(
    sizes=dict.fromkeys(MODELS),
    max_batch_size=16,
    parity_batch=4,
    duration_s=3.0,
    warmup_calls=3,
    images=16,
    image_sizes=DEFAULT_SIZES,
    bench_models=("classifier", "segmenter"),
    budget_s=450.0,
)
DRY_RUN = Profile(
    sizes=dict.fromkeys(MODELS, 64),
    max_batch_size=2,
    parity_batch=2,
    duration_s=0.2,
    warmup_calls=1,
    images=2,
    image_sizes=((80, 60), (60, 80)),
    bench_models=(),
    budget_s=85.0,
    # One thread: two OpenMP threads spinning on two shared, busy cores run several times slower.
    cpu_threads=1,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see --help); unset options take the GPU or the --dry-run profile's value."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "loadtests" / "out" / "gpu_check",
        metavar="DIR",
        help=f"where {RESULT_FILE} (and the bench's bench/) go (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every step on the CPU with tiny sizes (about 20 s on 2 cores)",
    )
    parser.add_argument(
        "--weights",
        choices=("random", "pretrained"),
        default="random",
        help="classifier and detector weights: random, or torchvision's from $TORCH_HOME (default: random)",
    )
    parser.add_argument(
        "--input-size",
        action="append",
        default=[],
        metavar="MODEL=PX",
        help="input side for one model, e.g. segmenter=512 (default: the export's; 64 with --dry-run)",
    )
    parser.add_argument("--max-batch-size", type=int, metavar="N", help="largest batch measured (16; 2)")
    parser.add_argument(
        "--duration", type=float, metavar="S", help="measured seconds per batch size (3; 0.2)"
    )
    parser.add_argument(
        "--bench-models",
        metavar="LIST",
        help="models the gateway bench serves, comma-separated, 'none' skips it "
        "(classifier,segmenter; none with --dry-run)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="seconds for the whole run; the bench gets what is left (450; 85)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        help="keep the exported model repository here (default: a temporary directory, removed)",
    )
    args = parser.parse_args(argv)
    profile = DRY_RUN if args.dry_run else GPU
    sizes = dict(profile.sizes)
    for item in args.input_size:
        model, _, px = item.partition("=")
        if model not in MODELS or not px.isdigit():
            parser.error(f"--input-size {item!r}: expected MODEL=PX with MODEL one of {', '.join(MODELS)}")
        sizes[model] = int(px)
    bench_models = profile.bench_models
    if args.bench_models is not None:
        bench_models = tuple(m.strip() for m in args.bench_models.split(",") if m.strip() not in ("", "none"))
        if set(bench_models) - set(MODELS):
            parser.error(f"--bench-models {args.bench_models!r}: choose from {','.join(MODELS)} or none")
    args.profile = dataclasses.replace(
        profile,
        sizes=sizes,
        max_batch_size=args.max_batch_size or profile.max_batch_size,
        duration_s=args.duration or profile.duration_s,
        bench_models=bench_models,
        budget_s=args.budget or profile.budget_s,
    )
    if args.profile.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    return args


# --- environment ------------------------------------------------------------------------------


def pick_device(dry_run: bool) -> torch.device:
    """CUDA, or the CPU for a dry run; without CUDA a real run stops here."""
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise CheckError(
            f"no CUDA device (torch {torch.__version__}, {built}, sees none): run this on a GPU machine, "
            "or add --dry-run to rehearse every step on the CPU"
        )
    return torch.device("cuda")


def describe(device: torch.device) -> dict[str, Any]:
    """The device and software the figures come from."""
    info: dict[str, Any] = {"type": device.type, "cpus": os.cpu_count(), "processor": platform.processor()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def versions() -> dict[str, Any]:
    """torch, torchvision, CUDA and cuDNN as this process sees them."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }


# --- export -----------------------------------------------------------------------------------


def random_checkpoint(model: str, work: Path, input_size: int | None) -> SourceOptions:
    """A seeded random state dict of `model`'s architecture, as a `--weights checkpoint` source."""
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
    checkpoint, classes = work / f"{model}.pt", work / f"{model}-classes.txt"
    torch.save(module.state_dict(), checkpoint)
    classes.write_text("".join(f"{label}\n" for label in labels))
    return SourceOptions(
        weights="checkpoint", arch=arch, checkpoint=checkpoint, classes=classes, input_size=input_size
    )


def weight_source(model: str, weights: str, work: Path, input_size: int | None) -> SourceOptions:
    """`model`'s weights: a random checkpoint, or torchvision's pretrained files (it has no U-Net)."""
    if weights == "pretrained" and model != "segmenter":
        return SourceOptions(weights="pretrained", input_size=input_size)
    return random_checkpoint(model, work, input_size)


def export_argv(model: str, source: SourceOptions, repository: Path, max_batch_size: int) -> list[str]:
    """`python -m export` arguments that export `model` from `source` into `repository`."""
    preferred = sorted({max(1, max_batch_size // 2), max_batch_size})
    argv = [
        model, "--weights", source.weights, "--out", str(repository),
        "--cpu-out", str(repository.with_name(f"{repository.name}-cpu")),
        "--max-batch-size", str(max_batch_size), "--preferred-batch-sizes", *map(str, preferred),
    ]  # fmt: skip
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


def export_model(model: str, source: SourceOptions, repository: Path, max_batch_size: int) -> dict[str, Any]:
    """Run the export CLI for one model; say what it wrote."""
    argv = export_argv(model, source, repository, max_batch_size)
    started = time.monotonic()
    if export_main(argv) != 0:
        raise CheckError(f"`python -m export {' '.join(argv)}` failed (its error is above)")
    contract = load_contract(repository, model)
    return {
        "command": f"python -m export {' '.join(argv)}",
        "weights": contract.parameters["weights"],
        "input_size": contract.inputs[0].dims[-1],
        "labels": len(contract.labels),
        "model_pt_mib": round((repository / model / "1" / "model.pt").stat().st_size / 2**20, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


# --- parity -----------------------------------------------------------------------------------


def parity_images(model: str, size: int, batch: int) -> torch.Tensor:
    """Seeded uint8 noise plus one shapes scene (a single shape for the classifier)."""
    noise = torch.randint(
        0, 256, (batch - 1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(SEED)
    )
    shapes = (1, 1) if model == "classifier" else (1, 4)
    scene = make_scene(SEED, size, *shapes).image
    return torch.cat([noise, torch.from_numpy(scene).permute(2, 0, 1)[None]])


def _outputs(result: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


def _check(name: str, value: float) -> dict[str, Any]:
    """One comparison against its tolerance; a non-finite value is reported as null and fails."""
    tolerance = TOLERANCES[name]
    finite = math.isfinite(value)
    output, metric = name.split(" ")
    return {
        "output": output,
        "metric": metric,
        "value": value if finite else None,
        "tolerance": tolerance,
        "passed": finite and value <= tolerance,
    }


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def detector_checks(eager: list[torch.Tensor], scripted: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Counts, sorted scores, and each eager box against its closest same-label scripted box.

    Matching boxes (instead of comparing rows) keeps equal-score detections in either order equal.
    """
    (boxes_e, scores_e, labels_e, count_e), (boxes_s, scores_s, labels_s, count_s) = eager, scripted
    score_diff, box_diff = 0.0, 0.0
    for i in range(len(count_e)):
        n_e, n_s = int(count_e[i, 0]), int(count_s[i, 0])
        n = min(n_e, n_s)
        score_diff = max(score_diff, _max_abs(scores_e[i, :n], scores_s[i, :n]))
        if n_e == 0:
            continue
        distance = (boxes_e[i, :n_e, None, :] - boxes_s[i, None, :n_s, :]).abs().amax(dim=-1)
        distance[labels_e[i, :n_e, None] != labels_s[i, None, :n_s]] = math.inf
        closest = distance.amin(dim=1) if n_s else torch.full((n_e,), math.inf)
        box_diff = max(box_diff, float(closest.max()))
    return [
        _check("COUNT max_abs_diff", _max_abs(count_e, count_s)),
        _check("SCORES max_abs_diff", score_diff),
        _check("BOXES max_abs_diff", box_diff),
    ]


def _logits(wrapper: Any, images: torch.Tensor) -> torch.Tensor:
    """The wrapped network's raw output (export/wrappers.py: `model(normalize(image))`)."""
    return wrapper.model(wrapper.normalize(images)).float().cpu()


def check_parity(
    model: str, eager: nn.Module, scripted: torch.jit.ScriptModule, images: torch.Tensor, warmup_calls: int
) -> dict[str, Any]:
    """Compare the reloaded model.pt with its eager model on `images` (already on the device)."""
    with torch.inference_mode():
        for _ in range(warmup_calls):
            scripted(images)
        expected, actual = _outputs(eager(images)), _outputs(scripted(images))
        layouts = [(t.shape, t.dtype) for t in expected], [(t.shape, t.dtype) for t in actual]
        mismatched = sum(a != b for a, b in zip(*layouts)) + abs(len(expected) - len(actual))
        checks = [_check("outputs mismatched_tensors", mismatched)]
        compared: dict[str, int] = {}
        if not mismatched:  # otherwise nothing else is comparable
            expected, actual = [t.float().cpu() for t in expected], [t.float().cpu() for t in actual]
            if model == "detector":
                checks += detector_checks(expected, actual)
                compared = {"detections": int(expected[3].sum())}
            else:
                logits = _max_rel(_logits(scripted, images), _logits(eager, images))
                if model == "classifier":
                    checks.append(_check("PROBS max_abs_diff", _max_abs(actual[0], expected[0])))
                    compared = {"top1_classes": len(expected[0].argmax(dim=1).unique())}
                else:
                    mismatch = float((actual[0] != expected[0]).float().mean())
                    checks.append(_check("MASK mismatch_fraction", mismatch))
                    compared = {"mask_classes": len(expected[0].unique())}
                checks.append(_check("logits max_rel_diff", logits))
    return {
        "passed": all(c["passed"] for c in checks),
        "images": len(images),
        "input_size": images.shape[-1],
        **compared,
        "checks": checks,
    }


# --- throughput -------------------------------------------------------------------------------


def measure_throughput(
    model: str, repository: Path, device: torch.device, images: list[EncodedImage], profile: Profile
) -> list[dict[str, Any]]:
    """Images/s of the model alone at batch sizes 1..N, and of the whole pipeline at N, on `device`.

    The gateway's own model runner copies each batch to the device and the outputs back, so a timed
    batch covers the transfers and waits for the GPU to finish.
    """
    settings = Settings(model_repository=repository, max_batch_size=profile.max_batch_size)
    pipeline = ModelPipeline(
        TaskPipeline.load(settings, model), TorchScriptModel(repository, model, device.type)
    )
    prepared = [pipeline.prepare(image.data)[0] for image in images]
    sizes = batch_sizes(settings, pipeline.contract.max_batch_size)
    for size in sizes:
        for _ in range(profile.warmup_calls):
            pipeline.infer([prepared[i % len(prepared)] for i in range(size)])
    results = measure_model(pipeline, prepared, sizes, profile.duration_s)
    results.append(measure_pipeline(pipeline, images, sizes[-1], profile.duration_s))
    for r in results:
        log.info("%s %-8s batch %2d: %8.1f images/s", model, r.stage, r.batch_size, r.images_per_s)
    return [dataclasses.asdict(r) for r in results]


# --- gateway bench ----------------------------------------------------------------------------


def bench_command(models: Sequence[str], out: Path) -> list[str]:
    """`python -m loadtests.bench`, short, on the embedded backend."""
    return [
        sys.executable,
        "-m",
        "loadtests.bench",
        "--models",
        ",".join(models),
        *BENCH_ARGS,
        "--out",
        str(out),
    ]


def run_bench(
    models: Sequence[str],
    repository: Path,
    out: Path,
    device: torch.device,
    profile: Profile,
    timeout_s: float,
) -> dict[str, Any]:
    """The gateway on `repository` under load; its figures, or why there are none.

    `timeout_s` covers the bench and its shutdown: past `timeout_s - BENCH_STOP_S` it is interrupted.
    """
    if not models:
        return {"status": "skipped", "reason": "no models chosen (--bench-models)"}
    command = bench_command(models, out)
    result: dict[str, Any] = {
        "command": f"python {' '.join(command[1:])}",
        "device": device.type,
        "note": "the gateway runs on the device; bench.json's own in-process figures are the CPU's",
    }
    run_s = timeout_s - BENCH_STOP_S
    if run_s < BENCH_MIN_S:
        return result | {"status": "skipped", "reason": f"{timeout_s:.0f}s of the budget left"}
    env = {
        **os.environ,
        "CVSERVE_DEVICE": device.type,
        "CVSERVE_MODEL_REPOSITORY": str(repository),
        "CVSERVE_MAX_BATCH_SIZE": str(profile.max_batch_size),
        "PYTHONPATH": str(ROOT),
    }
    out.mkdir(parents=True, exist_ok=True)
    log.info("gateway bench (at most %.0fs): %s", run_s, result["command"])
    started = time.monotonic()
    with open(out / "bench.log", "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=run_s)
        except subprocess.TimeoutExpired:
            return result | {"status": "timed out", "reason": f"after {run_s:.0f}s (see {out / 'bench.log'})"}
        finally:
            _interrupt(process)
    result["seconds"] = round(time.monotonic() - started, 1)
    if returncode != 0 or not (out / "bench.json").is_file():
        return result | {"status": "failed", "reason": f"exit {returncode}, see {out / 'bench.log'}"}
    bench = json.loads((out / "bench.json").read_text())
    result["models"] = {
        m["model"]: {
            "loads": [
                {
                    k: load[k]
                    for k in ("system", "concurrency", "throughput_rps", "p50_ms", "p99_ms", "errors")
                }
                for load in m["loads"]
            ],
            "failed": m["failed"],
        }
        for m in bench["models"]
    }
    return result | {"status": "ok"}


def _interrupt(process: subprocess.Popen[bytes]) -> None:
    """Stop a bench still running: Ctrl-C lets its `with` blocks stop the servers; then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=BENCH_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the run ----------------------------------------------------------------------------------


def check_model(
    model: str,
    source: SourceOptions,
    repository: Path,
    device: torch.device,
    images: list[EncodedImage],
    profile: Profile,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Export one model, compare it with its eager model, measure it: (export, parity, throughput)."""
    exported = export_model(model, source, repository, profile.max_batch_size)
    spec = load_specs([model], source)[0]  # the same weights, as the eager model the export scripted
    eager = spec.module.to(device)
    scripted = load_torchscript(repository / model / "1" / "model.pt", device)
    parity = check_parity(
        model, eager, scripted, parity_images(model, spec.input_size, profile.parity_batch).to(device),
        profile.warmup_calls,
    )  # fmt: skip
    log.info("%s parity %s: %s", model, "ok" if parity["passed"] else "FAILED", parity["checks"])
    del eager, scripted, spec
    throughput = measure_throughput(model, repository, device, images, profile)
    return exported, parity, throughput


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every step, in order; the results as gpu_check.json holds them."""
    started = time.monotonic()
    profile: Profile = args.profile
    device = pick_device(args.dry_run)
    if profile.cpu_threads:
        torch.set_num_threads(profile.cpu_threads)
    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": describe(device),
        "versions": versions(),
        "profile": dataclasses.asdict(profile) | {"weights": args.weights},
        "tolerances": TOLERANCES,
        "export": {},
        "parity": {},
        "throughput": {},
    }
    log.info("gpu check on %s (%s)", results["device"]["name"], "dry run" if args.dry_run else device.type)
    repository = args.repository.resolve() if args.repository else work / "model_repository"
    images = make_image_mix(profile.images, profile.image_sizes)
    for model in MODELS:
        source = weight_source(model, args.weights, work, profile.sizes[model])
        try:
            exported, parity, throughput = check_model(model, source, repository, device, images, profile)
        except RuntimeError as exc:  # e.g. a graph that scripts but fails on CUDA: report it, go on
            log.error("%s failed: %s", model, exc)
            results["parity"][model] = {"passed": False, "error": str(exc).strip().splitlines()[0]}
            continue
        results["export"][model] = exported
        results["parity"][model] = parity
        results["throughput"][model] = throughput
        if device.type == "cuda":
            torch.cuda.empty_cache()  # leave the GPU to the gateway bench
    results["bench"] = run_bench(
        profile.bench_models, repository, args.out / "bench", device, profile,
        profile.budget_s - (time.monotonic() - started),
    )  # fmt: skip
    parity_ok = all(p["passed"] for p in results["parity"].values())
    results["passed"] = parity_ok and results["bench"]["status"] != "failed"
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write DIR/gpu_check.json; a failure is one line on stderr and exit 1."""
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            results = run(args, Path(work))
    except CheckError as exc:
        sys.stderr.write(f"gpu_check: error: {exc}\n")
        return 1
    path = args.out / RESULT_FILE
    path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("%s in %.0fs: wrote %s", "passed" if results["passed"] else "FAILED", results["wall_s"], path)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
