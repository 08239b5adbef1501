"""Export models to TorchScript and ONNX in Triton model repositories (libtorch/GPU, python-backend/CPU,
onnxruntime/GPU).

Each model gets <out>/<model>/1/model.pt and, beside it, model.onnx (the same uint8-in contract and
dynamic batch, for ONNX Runtime); --cpu-out serves the same model.pt with Triton's python backend and
--onnx-out the same model.onnx with Triton's onnxruntime backend.

Models: classifier, detector, segmenter, or all.
Weight sources (--weights):
  demo        artifacts/demo/*.pt + meta.json from `python -m training` (trained first if missing)
  pretrained  torchvision weights: classifier ResNet50_Weights.IMAGENET1K_V2, detector
              FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1 (downloaded, or read from a filled
              $TORCH_HOME/hub/checkpoints offline); torchvision has no pretrained U-Net
  checkpoint  your state dict (torch file loaded with weights_only=True, or .safetensors) with
              --checkpoint FILE --classes FILE (one name per class, as labels.txt) and --arch

Examples:
  python -m export all --weights demo
  python -m export detector --weights pretrained --input-size 800
  python -m export classifier --weights checkpoint --arch resnet50 --checkpoint ft.pt --classes names.txt
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from export.errors import ExportError
from export.precision import PRECISIONS, with_precision
from export.repository import VERSION, Batching, OnnxOptions, existing_versions, staged, write_model
from export.sources import ARCHITECTURES, WEIGHT_SOURCES, SourceOptions, load_specs
from export.spec import MODELS
from service.buckets import BUCKETS, GPU_MAX_BATCH, buckets_up_to

log = logging.getLogger("export")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other export error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = _Parser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", nargs="?", default="all", choices=(*MODELS, "all"), help="model to export (default: all)"
    )
    parser.add_argument(
        "--weights", default="demo", choices=WEIGHT_SOURCES, help="weight source (default: demo)"
    )
    parser.add_argument(
        "--arch",
        default="demo",
        choices=sorted({arch for archs in ARCHITECTURES.values() for arch in archs}),
        help="checkpoint architecture: demo (training/models.py), resnet50 (classifier), "
        "fasterrcnn_resnet50_fpn_v2 (detector) (default: demo)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, metavar="FILE", help="state dict file for --weights checkpoint"
    )
    parser.add_argument(
        "--classes", type=Path, metavar="FILE", help="class names, one per line, for --weights checkpoint"
    )
    parser.add_argument(
        "--demo-dir",
        type=Path,
        metavar="DIR",
        default=Path("artifacts/demo"),
        help="demo weights (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=Path("model_repository"),
        help="libtorch repository (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu-out",
        type=Path,
        metavar="DIR",
        default=Path("build/triton_cpu_repository"),
        help="python-backend repository serving the same model.pt (default: %(default)s)",
    )
    parser.add_argument(
        "--onnx-out",
        type=Path,
        metavar="DIR",
        help="onnxruntime-backend repository serving the same model.onnx (default: triton_onnx_repository "
        "beside --cpu-out)",
    )
    parser.add_argument(
        "--no-onnx",
        action="store_true",
        help="write model.pt and its two repositories only: no model.onnx, no ONNX Runtime repository",
    )
    parser.add_argument(
        "--onnx-tensorrt",
        action="store_true",
        help="--onnx-out's configs ask ONNX Runtime for TensorRT as GPU execution accelerator (FP32; Triton "
        "builds an engine per model at load time) instead of its CUDA provider alone",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        metavar="PX",
        help="square input side H=W (default: the weights' own: ResNet-50's crop 224, Faster R-CNN's "
        "min_size 800, the demo's training size)",
    )
    parser.add_argument(
        "--resize-size",
        type=int,
        metavar="PX",
        help="classifier: shorter side before the centre crop (default: the weights' own ratio to the crop)",
    )
    defaults = Batching()
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU serving profile: fp16 (unless --precision fp32), batch buckets up to each model's GPU batch "
        f"({', '.join(f'{m} {n}' for m, n in GPU_MAX_BATCH.items())}; service/buckets.py) unless "
        "--max-batch-size says, 2 instances per GPU in model_repository (--gpu-instances), and for fp16 no "
        "model.onnx (the fp16 network is TorchScript's; export fp32 for ONNX Runtime)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help=f"(default: {defaults.max_batch_size}; with --gpu each model's GPU batch)",
    )
    parser.add_argument(
        "--gpu-instances",
        type=int,
        metavar="N",
        help="model instances per GPU in model_repository's configs (default: 1; with --gpu 2)",
    )
    parser.add_argument(
        "--preferred-batch-sizes",
        type=int,
        metavar="N",
        nargs="+",
        help="dynamic batcher's preferred sizes (default: "
        f"{' '.join(map(str, defaults.preferred_batch_sizes))}; with --batch-buckets the buckets above 1)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        metavar="US",
        default=defaults.max_queue_delay_us,
        help="dynamic batcher's queue delay in microseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-buckets",
        action="store_true",
        help="warm-up only at the buckets up to --max-batch-size "
        f"({', '.join(map(str, BUCKETS))}; service/buckets.py), not at every size, and the buckets above 1 as "
        "Triton's preferred sizes (1 among them would send every lone request at once, and 3 queued as 1+1+1)",
    )
    parser.add_argument(
        "--version",
        metavar="N|next",
        help="write version N (or the next after the highest there) next to the versions already in the "
        "repositories, which keep serving (a running gateway loads it: README, Rolling out a new model); "
        "default: replace each model's directory with version 1 alone",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp16: the network runs in float16 with channels_last activations (for GPUs); uint8 in and "
        "the same outputs as fp32 (default: fp32; fp16 with --gpu)",
    )
    return parser


def run(args: argparse.Namespace) -> None:
    """Load the chosen weights, script and ONNX-export each model, write the three repositories (all or
    nothing)."""
    models = list(MODELS) if args.model == "all" else [args.model]
    if args.precision is None:
        args.precision = "fp16" if args.gpu else "fp32"
    if args.gpu:  # batch buckets; fp16 unless --precision says otherwise, and no model.onnx for an fp16 network
        args.batch_buckets = True
        args.no_onnx = args.no_onnx or args.precision == "fp16"
    batchings = {model: model_batching(args, model) for model in models}
    onnx_out = onnx_repository(args)
    if args.out.resolve() == args.cpu_out.resolve():
        raise ExportError(
            f"--out and --cpu-out are both {args.out}: the two repositories need two directories"
        )
    if onnx_out.resolve() in (args.out.resolve(), args.cpu_out.resolve()):
        raise ExportError(f"--onnx-out {onnx_out} is --out or --cpu-out: each repository needs its own directory")
    options = SourceOptions(
        weights=args.weights,
        arch=args.arch,
        checkpoint=args.checkpoint,
        classes=args.classes,
        demo_dir=args.demo_dir,
        input_size=args.input_size,
        resize_size=args.resize_size,
    )
    # Staging first: an unwritable output fails in a second, not after loading and scripting.
    targets = [args.out, args.cpu_out] + ([] if args.no_onnx else [onnx_out])
    version = new_version(args.version, targets, models)
    with staged(targets, version or VERSION, beside=version is not None) as (gpu, cpu, *onnx):
        for spec in load_specs(models, options):
            write_model(
                with_precision(spec, args.precision),
                gpu,
                cpu,
                onnx[0] if onnx else None,
                batchings[spec.name],
                OnnxOptions(tensorrt=args.onnx_tensorrt),
            )


def model_batching(args: argparse.Namespace, model: str) -> Batching:
    """`model`'s dynamic-batching settings from the arguments (`--gpu`: its GPU batch, buckets, 2 instances)."""
    default = Batching()
    largest = args.max_batch_size
    if largest is None:
        largest = GPU_MAX_BATCH[model] if args.gpu else default.max_batch_size
    instances = args.gpu_instances
    if instances is None:
        instances = 2 if args.gpu else default.gpu_instances
    asked = None if args.preferred_batch_sizes is None else tuple(args.preferred_batch_sizes)
    preferred = default.preferred_batch_sizes if asked is None else asked
    batching = Batching(largest, preferred, args.max_queue_delay_us, gpu_instances=instances)
    if args.batch_buckets:
        # Triton cannot pad a batch: it sends a preferred size when it can form one, else what is queued once
        # the oldest request has waited the queue delay. Without 1 among the preferred sizes, a lone request
        # waits that delay for company, and three queued requests go as one batch of 3, not 1 + 1 + 1.
        buckets = buckets_up_to(largest)
        preferred = asked if asked is not None else tuple(b for b in buckets if b > 1) or buckets
        batching = replace(batching, preferred_batch_sizes=preferred, warmup_sizes=buckets)
    batching.check()
    return batching


def new_version(asked: str | None, targets: list[Path], models: list[str]) -> str | None:
    """`--version`: None (replace with version 1), N, or for "next" one past the highest of `models` in
    `targets`; ExportError if that version exists already (a version is never overwritten)."""
    if asked is None:
        return None
    if asked == "next":
        highest = max((v for t in targets for m in models for v in existing_versions(t, m)), default=0)
        return str(highest + 1)
    if not asked.isdigit() or int(asked) < 1:
        raise ExportError(f"--version must be a positive number or 'next', got {asked!r}")
    taken = [str(t / m / str(int(asked))) for t in targets for m in models if int(asked) in existing_versions(t, m)]
    if taken:
        raise ExportError(f"version {int(asked)} exists already ({', '.join(taken)}): use --version next")
    return str(int(asked))


def onnx_repository(args: argparse.Namespace) -> Path:
    """--onnx-out, or triton_onnx_repository beside --cpu-out (build/ by default)."""
    return args.onnx_out if args.onnx_out is not None else args.cpu_out.parent / "triton_onnx_repository"


def main(argv: list[str] | None = None) -> int:
    """Run the export; bad input is one line on stderr and exit status 1 (usage errors: 2)."""
    args = get_args_parser().parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the staging directories are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Progress goes to stdout so that stderr carries nothing but a failure's one line.
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    started = time.monotonic()
    try:
        run(args)
    except ExportError as exc:
        sys.stderr.write(f"export: error: {exc}\n")
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"export: error: {exc.strerror or exc}{where}\n")
        return 1
    written = [args.out, args.cpu_out] + ([] if args.no_onnx else [onnx_repository(args)])
    log.info(
        "exported %s (%s weights, %s) to %s in %.1fs",
        args.model,
        args.weights,
        args.precision,
        ", ".join(map(str, written)),
        time.monotonic() - started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
