"""GPU check: export the three models, check them on CUDA (fp32 and fp16), measure the model, JPEG
decode on the device and the Ray-free HTTP app, and write one JSON file after every step.

Models: torchvision's ResNet-50 classifier (224 px) and Faster R-CNN ResNet-50-FPN v2 detector (800
and 640 px), and the project's U-Net segmenter (512 px). Weights are random (seeded; saved as
checkpoints and exported with `--weights checkpoint`) unless --weights pretrained, which reads
torchvision's files from a filled $TORCH_HOME cache; torchvision has no U-Net.

Steps, each in its own process with its own time limit (a hung or crashed step is recorded and the
next one runs): environment (device, versions, installed packages, the carried wheels' needs);
model:<name>[@<px>] (export fp32 and fp16 at batch buckets, reloaded model.pt against the eager
model, fp16 against fp32, images/s of the model alone per bucket and precision, the in-process
pipeline); decode (nvJPEG batch decode against Pillow); http (uvicorn processes feeding one model
owner, a multi-process load generator); onnx (a hook, loadtests/gpu/steps.py `step_onnx`).
On the GPU the steps run one after another, each timed alone; --dry-run runs the steps that need
nothing of each other side by side (`waves`). Writes DIR/gpu_check.json after every step; exits 1
if a parity check or a step failed. --budget (450 s) caps the whole run: one command on a GPU
machine stays under 8 minutes.

    bash loadtests/gpu_check.sh --wheels .whl --out $OUT/gpu_check    # on the GPU machine
    bash loadtests/gpu_check.sh --dry-run --out /tmp/gpu_check          # every step on the CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.gpu.http import STEP_TIMEOUT_VARIABLE
from loadtests.gpu.parity import FP16_TOLERANCES, TOLERANCES
from service.buckets import GPU_MAX_BATCH
from tasks import MODELS

log = logging.getLogger("loadtests.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = "gpu_check.json"
LOG_FILE = "gpu_check.log"  # every step's log, one after the other (a device run brings back few files)
STUBS = ROOT / "loadtests" / "gpu" / "stubs"
STEP_MIN_S = 10.0  # a step is skipped when less of the budget is left
STOP_GRACE_S = 5.0  # a timed-out step's time to stop (SIGTERM, then SIGKILL)


class CheckError(Exception):
    """A run that cannot start; the message is the one line the command prints."""


@dataclass(frozen=True)
class Profile:
    """How big and how long: the GPU run, or the CPU rehearsal of every step (--dry-run)."""

    sizes: dict[str, int | None]  # input side per model; None: the export's default for the weights
    extra_sizes: dict[str, tuple[int, ...]]  # more input sides measured per model (the detector at 640)
    max_batch: dict[str, int]  # largest batch (the last bucket) per model
    parity_batch: int
    duration_s: float  # measured seconds per batch size, through the gateway's model runner
    sweep_s: float  # measured seconds per batch size and precision, the model alone
    warmup_calls: int  # calls before comparing or measuring (TorchScript optimises after profiling runs)
    images: int
    image_sizes: tuple[tuple[int, int], ...]
    fp16: bool
    decode: dict[str, Any]
    http: dict[str, Any]
    budget_s: float
    timeouts: dict[str, float]  # per step kind: environment, model, decode, http, onnx
    cpu_threads: int | None = None  # torch intra-op threads; None: torch's default
    step_env: dict[str, str] = field(default_factory=dict)  # environment variables each step's process gets
    # Steps that need nothing of each other run side by side (`waves`): a CPU rehearsal leaves cores idle
    # while one step's process imports, scripts and exports. A GPU run keeps one step at a time, each
    # timed alone on the device.
    side_by_side: bool = False
    steps: tuple[str, ...] = field(default=())  # filled by parse_args: the steps to run, in order


GPU = Profile(
    sizes={"classifier": None, "detector": 800, "segmenter": 512},
    extra_sizes={"detector": (640,)},
    max_batch=dict(GPU_MAX_BATCH),
    parity_batch=8,
    duration_s=0.5,
    sweep_s=0.5,
    warmup_calls=3,
    images=16,
    image_sizes=((640, 480), (1280, 720), (1920, 1080)),
    fp16=True,
    decode={"sizes": [[640, 480], [1920, 1080]], "batch": 32, "duration_s": 1.0, "letterbox": 640,
            "safety_iterations": 20},
    # 16 cores: 8 workers (about 0.85 ms of CPU per /classify request with device decode, measured here:
    # loadtests/RESULTS.md "CPU per request in the owner app"), a load generator of 4 processes (about
    # 0.1 ms per request) and the owner (about 0.1 ms of its one event loop's CPU per request besides the
    # device's work: "The model owner's own CPU"); 128 clients keep its batches full at 5,000 requests/s.
    http={
        "servers": 8,
        "client_processes": 4,
        "concurrency": 128,
        "duration_s": 10.0,
        "models": ["classifier", "detector", "segmenter"],
        "image_size": [640, 480],
        "max_batch": 32,
    },  # fmt: skip
    budget_s=450.0,
    timeouts={"environment": 60, "model": 120, "decode": 90, "http": 150, "onnx": 150},  # onnx: TensorRT builds
)
DRY_RUN = Profile(
    sizes=dict.fromkeys(MODELS, 64),
    extra_sizes={},
    max_batch=dict.fromkeys(MODELS, 2),
    parity_batch=2,
    duration_s=0.2,
    sweep_s=0.2,
    warmup_calls=1,
    images=2,
    image_sizes=((80, 60), (60, 80)),
    fp16=True,
    decode={"sizes": [[80, 60], [120, 90]], "batch": 2, "duration_s": 0.2, "letterbox": 64, "safety_iterations": 2},
    http={
        "servers": 2,
        "client_processes": 2,
        "concurrency": 4,
        "duration_s": 4.0,
        "models": ["classifier"],
        "image_size": [80, 60],
        "max_batch": 2,
    },  # fmt: skip
    budget_s=900.0,  # a shared 2-core machine takes about 3 minutes; the budget leaves room for a loaded one
    timeouts={"environment": 120, "model": 300, "decode": 120, "http": 240, "onnx": 120},
    # Both cores (the dry run alone: its detector step 75 -> 52 s), with OpenMP threads that sleep instead of
    # spinning while they wait: spinning threads on two shared, busy cores ran several times slower.
    cpu_threads=2,
    step_env={"OMP_WAIT_POLICY": "PASSIVE"},
    side_by_side=True,
)


def plan(profile: Profile) -> tuple[str, ...]:
    """Every step of a run with `profile`, in order."""
    models = [f"model:{m}" for m in MODELS]
    extra = [f"model:{m}@{px}" for m in MODELS for px in profile.extra_sizes.get(m, ())]
    # HTTP right after the exports it serves: /classify end to end is the run's headline figure, and an
    # extra input size is the first thing a tight budget may drop.
    return ("environment", *models, "http", "decode", "onnx", *extra)


def waves(steps: Sequence[str], side_by_side: bool) -> list[list[str]]:
    """`steps` in groups run one group after another; a group's steps run at once. One step per group
    unless `side_by_side`: then the environment first, every model step with decode (which needs no
    export), then the steps that use the exports (http serves the fp16 ones, onnx runs the fp32 ones)."""
    if not side_by_side:
        return [[name] for name in steps]
    stage = {"environment": 0, "model": 1, "decode": 1}
    groups: dict[int, list[str]] = {}
    for name in steps:
        groups.setdefault(stage.get(name.partition(":")[0], 2), []).append(name)
    return [groups[key] for key in sorted(groups)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see --help); unset options take the GPU or the --dry-run profile's value."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "out" / "gpu_check", metavar="DIR",
        help=f"where {RESULT_FILE} and the steps' logs (logs/) go (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="run every step on the CPU with tiny sizes")
    parser.add_argument(
        "--weights", choices=("random", "pretrained"), default="random",
        help="classifier and detector weights: random, or torchvision's from $TORCH_HOME (default: random)",
    )  # fmt: skip
    parser.add_argument(
        "--input-size", action="append", default=[], metavar="MODEL=PX",
        help="input side for one model, e.g. segmenter=512 (default: 224, 800 (and 640), 512; 64 with --dry-run)",
    )  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, metavar="N", help="cap every model's largest batch")
    parser.add_argument("--duration", type=float, metavar="S", help="measured seconds per batch size")
    parser.add_argument(
        "--steps", metavar="LIST",
        help="comma-separated steps to run (default: all); e.g. environment,model:classifier,http",
    )  # fmt: skip
    parser.add_argument("--no-fp16", action="store_true", help="export and measure fp32 only")
    parser.add_argument(
        "--http-models", metavar="LIST", help="models the HTTP step serves, comma-separated ('none' skips it)"
    )
    parser.add_argument(
        "--budget", type=float, metavar="S", help="seconds for the whole run (450; 900 with --dry-run)"
    )
    parser.add_argument(
        "--logs", type=Path, metavar="DIR",
        help="each step's log (and the HTTP servers') (default: DIR/logs); DIR/gpu_check.log has them all",
    )  # fmt: skip
    parser.add_argument(
        "--repository", type=Path, metavar="DIR",
        help="keep the exported model repositories here (default: a temporary directory, removed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    profile = DRY_RUN if args.dry_run else GPU
    sizes = dict(profile.sizes)
    for item in args.input_size:
        model, _, px = item.partition("=")
        if model not in MODELS or not px.isdigit():
            parser.error(f"--input-size {item!r}: expected MODEL=PX with MODEL one of {', '.join(MODELS)}")
        sizes[model] = int(px)
    max_batch = dict(profile.max_batch)
    if args.max_batch_size is not None:
        if args.max_batch_size < 1:
            parser.error("--max-batch-size must be at least 1")
        max_batch = {m: min(n, args.max_batch_size) for m, n in max_batch.items()}
    http = dict(profile.http)
    if args.http_models is not None:
        http["models"] = [m.strip() for m in args.http_models.split(",") if m.strip() not in ("", "none")]
        if set(http["models"]) - set(MODELS):
            parser.error(f"--http-models {args.http_models!r}: choose from {','.join(MODELS)} or none")
    profile = dataclasses.replace(
        profile,
        sizes=sizes,
        max_batch=max_batch,
        duration_s=args.duration or profile.duration_s,
        sweep_s=args.duration or profile.sweep_s,
        fp16=profile.fp16 and not args.no_fp16,
        http=http,
        budget_s=args.budget or profile.budget_s,
    )
    steps = plan(profile)
    if args.steps:
        chosen = tuple(s.strip() for s in args.steps.split(",") if s.strip())
        unknown = [s for s in chosen if s not in steps]
        if unknown:
            parser.error(f"--steps: unknown {', '.join(unknown)}; choose from {','.join(steps)}")
        steps = chosen
    args.profile = dataclasses.replace(profile, steps=steps)
    return args


def check_device(dry_run: bool) -> str:
    """cuda, or cpu for a dry run; without CUDA a real run stops here, before any step."""
    if dry_run:
        return "cpu"
    import torch  # on the GPU image; imported here only to ask whether a GPU is there

    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise CheckError(
            f"no CUDA device (torch {torch.__version__}, {built}, sees none): run this on a GPU machine, "
            "or add --dry-run to rehearse every step on the CPU"
        )
    return "cuda"


def step_environment_variables(out: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The steps' environment: the repository on the path, the av stand-in where PyAV is missing, and
    the profile's `extra` variables."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    try:
        import av  # noqa: F401
    except ImportError:
        paths.append(str(STUBS))  # last: a real av anywhere on the path wins
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        "CVSERVE_CHECK_OUT": str(out),
        **(extra or {}),
    }


def run_step(
    name: str, context: Path, work: Path, logs: Path, timeout_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """Run one step in its own process group for at most `timeout_s`; its JSON, or why there is none."""
    slug = name.replace(":", "-").replace("@", "-")
    result_file, log_file = work / f"{slug}.json", logs / f"{slug}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "loadtests.gpu.steps", name, str(context), str(result_file)]
    started = time.monotonic()
    entry: dict[str, Any] = {"name": name, "timeout_s": round(timeout_s), "log": str(log_file)}
    with open(log_file, "w") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env | {STEP_TIMEOUT_VARIABLE: f"{timeout_s:.0f}"}, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _stop(process)
    entry["seconds"] = round(time.monotonic() - started, 1)
    if returncode is None:  # keep the phases it finished (a model step saves them as it goes)
        partial = json.loads(result_file.read_text()) if result_file.is_file() else None
        return entry | {"status": "timed out"} | ({"result": partial} if partial else {})
    if returncode != 0 or not result_file.is_file():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] if log_file.is_file() else []
        partial = json.loads(result_file.read_text()) if result_file.is_file() else None
        failed = {"status": "failed", "exit": returncode, "error": tail[0][-300:] if tail else ""}
        return entry | failed | ({"result": partial} if partial else {})
    return entry | {"status": "ok", "result": json.loads(result_file.read_text())}


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a step's whole process group (its servers too): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    process.poll()


def merge(results: dict[str, Any], name: str, result: dict[str, Any]) -> None:
    """File a step's result under the run's keys (export/parity/throughput/... by model)."""
    kind, _, argument = name.partition(":")
    if kind == "environment":
        for key in ("device", "versions", "packages", "unmet_requirements", "http_imports_missing"):
            results[key] = result[key]
    elif kind == "model":
        key = argument
        for section in ("export", "parity", "throughput", "runner", "sweep", "export_fp16", "parity_fp16"):
            if section in result:
                results.setdefault(section, {})[key] = result[section]
        if "max_memory_gib" in result:
            results.setdefault("max_memory_gib", {})[key] = result["max_memory_gib"]
    else:
        results[kind] = result


def passed(results: dict[str, Any]) -> bool:
    """Every parity check passed (ONNX Runtime's providers' too), the CUDA runner answered as the plain one,
    device decode stayed within its tolerance, and no step failed or timed out."""
    parities = [*results.get("parity", {}).values(), *results.get("parity_fp16", {}).values()]
    steps_ok = all(step["status"] in ("ok", "skipped") for step in results["steps"])
    http_ok = results.get("http", {}).get("status") in (None, "ok", "skipped")
    decode_ok = results.get("decode", {}).get("passed", True)
    runners_ok = all(r["same_outputs"] for r in results.get("runner", {}).values())
    onnx_ok = results.get("onnx", {}).get("passed", True)
    return steps_ok and http_ok and decode_ok and runners_ok and onnx_ok and all(p["passed"] for p in parities)


# The targets on one H200: /classify end to end, and /detect end to end against the model alone.
CLASSIFY_RPS_TARGET = 5000.0
DETECT_RATIO_TARGET = 0.8


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The targets as far as the run measured them (None: not measured). They are goals, not checks:
    `passed` does not depend on them. /detect is compared with the detector alone at the HTTP step's
    precision and the largest batch the owner could run (the sweep's row at or below its batch limit)."""
    http = results.get("http", {})
    loads = http.get("loads", {})
    classify = loads.get("classifier", {}).get("throughput_rps")
    summary: dict[str, Any] = {
        "classify_rps": None if classify is None else {
            "value": classify, "target": CLASSIFY_RPS_TARGET, "met": classify >= CLASSIFY_RPS_TARGET,
            # which part was busy: one owner core near 1.0 bounds it there, the workers near theirs there
            "usage": loads["classifier"].get("usage"),
        },
        "detect_vs_model": None,
    }  # fmt: skip
    detect = loads.get("detector", {}).get("throughput_rps")
    limit = min(results.get("profile", {}).get("http", {}).get("max_batch", 0),
                results.get("profile", {}).get("max_batch", {}).get("detector", 0))  # fmt: skip
    rows = [r for r in results.get("sweep", {}).get("detector", {}).get(http.get("repository", ""), [])
            if r["batch_size"] <= limit]  # fmt: skip
    if detect is not None and rows:
        model = max(rows, key=lambda r: r["batch_size"])
        ratio = detect / model["images_per_s"] if model["images_per_s"] else 0.0
        summary["detect_vs_model"] = {
            "http_rps": detect, "model_images_per_s": model["images_per_s"], "batch_size": model["batch_size"],
            "precision": http["repository"], "ratio": round(ratio, 3), "target": DETECT_RATIO_TARGET,
            "met": ratio >= DETECT_RATIO_TARGET,
        }  # fmt: skip
    return summary


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every step, in order, writing the results after each; the results as gpu_check.json holds them."""
    started = time.monotonic()
    profile: Profile = args.profile
    device = check_device(args.dry_run)
    out: Path = args.out
    path = out / RESULT_FILE
    logs: Path = args.logs or out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    combined = out / LOG_FILE
    combined.write_text("")
    repository_root = args.repository.resolve() if args.repository else work
    context = work / "context.json"
    context.write_text(json.dumps({
        "dry_run": args.dry_run, "device": device, "weights": args.weights, "work": str(repository_root),
        "out": str(out), "logs": str(logs), "profile": dataclasses.asdict(profile),
    }))  # fmt: skip
    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": {"type": device},
        "profile": dataclasses.asdict(profile) | {"weights": args.weights},
        "tolerances": TOLERANCES | FP16_TOLERANCES,
        "steps": [],
        "passed": False,
    }
    env = step_environment_variables(out, profile.step_env)
    results["stubbed_modules"] = ["av"] if str(STUBS) in env["PYTHONPATH"] else []
    log.info("gpu check (%s): %s", "dry run" if args.dry_run else device, ", ".join(profile.steps))

    def step(name: str) -> dict[str, Any]:
        left = profile.budget_s - (time.monotonic() - started)
        skip = _skip_reason(name, results, left)
        if skip:
            return {"name": name, "status": "skipped", "reason": skip}
        timeout_s = step_timeout(name, profile, left)
        log.info("step %s (at most %.0fs)", name, timeout_s)
        return run_step(name, context, work, logs, timeout_s, env)

    for wave in waves(profile.steps, profile.side_by_side):
        with ThreadPoolExecutor(len(wave)) as pool:
            entries = list(pool.map(step, wave))
        for name, entry in zip(wave, entries, strict=True):
            _append_logs(combined, logs, name)
            if "result" in entry:
                merge(results, name, entry.pop("result"))
            log.info("step %s: %s in %ss", name, entry["status"], entry.get("seconds", 0))
            results["steps"].append(entry)
        results["steps"].sort(key=lambda entry: profile.steps.index(entry["name"]))
        results["passed"] = passed(results)
        results["targets"] = targets(results)
        results["wall_s"] = round(time.monotonic() - started, 1)
        path.write_text(
            json.dumps(results, indent=2) + "\n"
        )  # after every step (every wave of steps side by side): a killed run keeps its figures
    return results


def step_timeout(name: str, profile: Profile, left: float) -> float:
    """Seconds step `name` may run with `left` seconds of the budget: its kind's limit, and for a step planned
    before the HTTP step no more than leaves that step its whole limit. The model steps write their exports
    first, so one stopped early still leaves the HTTP step what it serves: /classify end to end comes before
    the rest of a model step's figures when the budget is short."""
    timeout_s = min(profile.timeouts[name.partition(":")[0]], left - STOP_GRACE_S)
    steps = profile.steps
    if "http" in steps and name in steps and steps.index(name) < steps.index("http"):
        reserve = profile.timeouts["http"] + 2 * STOP_GRACE_S
        timeout_s = max(STEP_MIN_S, min(timeout_s, left - reserve))
    return timeout_s


def _append_logs(combined: Path, logs: Path, name: str) -> None:
    """Add the logs a step wrote (its own, and its servers') to the combined log."""
    slug = name.replace(":", "-").replace("@", "-")
    with open(combined, "a") as out:
        for log_path in [logs / f"{slug}.log", *sorted(logs.glob(f"{slug}-*.log"))]:
            if log_path.is_file():
                out.write(f"===== {log_path.name}\n{log_path.read_text(errors='replace')}\n")


def _skip_reason(name: str, results: dict[str, Any], left: float) -> str | None:
    if left < STEP_MIN_S + STOP_GRACE_S:
        return f"{left:.0f}s of the budget left"
    if name == "http":
        if not results["profile"]["http"]["models"]:
            return "no models chosen (--http-models)"
        missing = results.get("http_imports_missing")
        if missing:
            return f"the app's imports fail here: {', '.join(sorted(missing))} (see the environment step)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write DIR/gpu_check.json; a run that cannot start is one line on stderr and exit 1."""
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
    log.info("targets: %s", json.dumps(results.get("targets")))
    log.info(
        "%s in %.0fs: wrote %s",
        "passed" if results["passed"] else "FAILED",
        results["wall_s"],
        args.out / RESULT_FILE,
    )
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
