"""TorchScript against ONNX Runtime, like for like, in one process and one run.

For each model, both runtimes load the same export (model.pt and model.onnx, one contract) into the
gateway's own pipeline (`loadtests.baselines.pipeline.ModelPipeline`) and run, on the same image
mix: decode + preprocess + model + postprocess per image (`measure_pipeline`) and the model alone
(`measure_model`), at each --batch-sizes. Runtimes alternate in --rounds rounds so that a change in
the machine's load hits both; the figure is the median round, the spread (min..max over rounds) is
the noise. Prints a table and the faster runtime per model (what `CVSERVE_RUNTIME=auto` should pick,
`service.backends.runtimes.CPU_DEFAULTS`); writes runtimes.json under --out.

    python -m loadtests.runtimes                        # all models, batch 1 and 8, ~5 minutes on 2 cores
    python -m loadtests.runtimes --models classifier --rounds 2 --duration 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, get_args

import torch

import tasks
from loadtests.baselines.pipeline import ModelPipeline
from loadtests.images import DEFAULT_SIZES, make_image_mix
from loadtests.inprocess import RawResult, measure_model, measure_pipeline
from service.backends.runtimes import Runtime, runtime_of
from service.settings import Settings

log = logging.getLogger("loadtests.runtimes")

RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(tasks.MODELS), help="comma-separated models")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, runtimes alternating (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default: %(default)s)")
    parser.add_argument("--images", type=int, default=16, help="distinct images in the mix (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "out")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(tasks.MODELS))
    if unknown or not args.models:
        parser.error(f"--models: unknown or empty {unknown}; choose from {','.join(tasks.MODELS)}")
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    return args


def measure(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    """Per model, runtime, stage and batch size: images/s of every round."""
    images = make_image_mix(args.images, DEFAULT_SIZES)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        pipelines = {
            runtime: ModelPipeline.load(settings.model_copy(update={"runtime": runtime}), model) for runtime in RUNTIMES
        }
        assert [runtime_of(p.model) for p in pipelines.values()] == list(RUNTIMES)
        for pipeline in pipelines.values():  # as the gateway does: TorchScript optimises per shape on run 2
            pipeline.model.warm_up(args.batch_sizes, runs=2)
        prepared = [pipelines[RUNTIMES[0]].prepare(image.data)[0] for image in images]
        rounds: dict[tuple[str, str, int], list[RawResult]] = {}
        for round_ in range(args.rounds):
            order = RUNTIMES if round_ % 2 == 0 else RUNTIMES[::-1]
            for runtime in order:
                pipeline = pipelines[runtime]
                for size in args.batch_sizes:
                    results = [
                        measure_pipeline(pipeline, images, size, args.duration),
                        *measure_model(pipeline, prepared, [size], args.duration),
                    ]
                    for result in results:
                        rounds.setdefault((runtime, result.stage, size), []).append(result)
                        log.info(
                            "%s round %d %-11s %-8s batch %d: %7.1f images/s",
                            model, round_, runtime, result.stage, size, result.images_per_s,
                        )  # fmt: skip
        for (runtime, stage, size), results in rounds.items():
            per_round = [r.images_per_s for r in results]
            rows.append(
                {
                    "model": model,
                    "runtime": runtime,
                    "stage": stage,
                    "batch_size": size,
                    "images_per_s": statistics.median(per_round),
                    "ms_per_image": 1000 / statistics.median(per_round),
                    "rounds_images_per_s": per_round,
                    "spread": (max(per_round) - min(per_round)) / statistics.median(per_round),
                    "batch_ms_p50": statistics.median(r.batch_ms_p50 for r in results),
                    "raw": [dataclasses.asdict(r) for r in results],
                }
            )
    return rows


def verdicts(rows: list[dict[str, Any]], models: list[str]) -> dict[str, dict[str, Any]]:
    """Per model: the runtime with more decode+model+post images/s at every batch size measured, and by how
    much (ONNX Runtime's figure over TorchScript's, per batch size); "mixed" if neither wins everywhere."""
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        pipeline = {(r["runtime"], r["batch_size"]): r for r in rows if r["model"] == model and r["stage"] == "pipeline"}
        sizes = sorted({size for _, size in pipeline})
        ratios = {
            size: pipeline["onnxruntime", size]["images_per_s"] / pipeline["torchscript", size]["images_per_s"]
            for size in sizes
        }
        if all(ratio > 1 for ratio in ratios.values()):
            faster = "onnxruntime"
        elif all(ratio < 1 for ratio in ratios.values()):
            faster = "torchscript"
        else:
            faster = "mixed"
        out[model] = {"faster": faster, "onnxruntime_over_torchscript": ratios}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per model, stage and batch size: both runtimes' ms/image, their ratio and the noise."""
    lines = [
        f"{'model':<11} {'stage':<9} {'batch':>5}  {'torchscript ms/img':>18}  {'onnxruntime ms/img':>18}  "
        f"{'ORT speed-up':>12}  {'spread ts / ort':>15}"
    ]
    keys = dict.fromkeys((r["model"], r["stage"], r["batch_size"]) for r in rows)
    by = {(r["model"], r["stage"], r["batch_size"], r["runtime"]): r for r in rows}
    for model, stage, size in sorted(keys, key=lambda k: (k[0], k[1] != "pipeline", k[2])):
        ts, ort = by[model, stage, size, "torchscript"], by[model, stage, size, "onnxruntime"]
        lines.append(
            f"{model:<11} {stage:<9} {size:>5}  {ts['ms_per_image']:>18.2f}  {ort['ms_per_image']:>18.2f}  "
            f"{ort['images_per_s'] / ts['images_per_s']:>11.2f}x  "
            f"{100 * ts['spread']:>6.0f}% / {100 * ort['spread']:>3.0f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure both runtimes, print the table and the verdicts, write runtimes.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    started, load_start = time.time(), os.getloadavg()
    rows = measure(args, settings)
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "threads": settings.torch_threads,
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "verdicts": verdicts(rows, args.models),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtimes.json").write_text(json.dumps(result, indent=2))
    print(table(rows))
    print(f"\nload average {load_start[0]:.2f} at start, {result['loadavg_end'][0]:.2f} at end; {os.cpu_count()} CPUs")
    for model, verdict in result["verdicts"].items():
        ratios = ", ".join(f"batch {b}: {r:.2f}x" for b, r in verdict["onnxruntime_over_torchscript"].items())
        print(f"{model}: faster runtime {verdict['faster']} (ONNX Runtime decode+model+post images/s over TorchScript's: {ratios})")
    print(f"wrote {args.out / 'runtimes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
