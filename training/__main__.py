"""Train the three demo models (classifier, detector, segmenter) on generated shapes scenes.

Writes state dicts to OUT/{classifier,detector,segmenter}.pt, OUT/meta.json (classes, input sizes,
normalisation) and OUT/report.json (held-out quality against the bars, seconds per model).
A run whose training key (config, code, library versions, device; `training.train.training_key`)
matches the one in OUT, or in the cache outside the clone, reuses it; --force retrains.
The cache is $CVSERVE_CACHE, else $XDG_CACHE_HOME/cvserve, else ~/.cache/cvserve (`training.cache`).
Exits 1 when a model misses its quality bar.

    python -m training [--out artifacts/demo] [--seed 0] [--device cpu|cuda] [--fp32] [--force] [--no-cache]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from training.cache import default_cache_dir
from training.train import DemoConfig, run


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="training seed (held-out scenes never change)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="float32 throughout, even where bfloat16 autocast is native (by default it is used there)",
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain even if OUT or the cache holds results for this key"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=default_cache_dir(os.environ),
        help="directory of trained models shared by clones (default: %(default)s)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run training; return the process exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        parser.error(f"device {args.device!r} is not usable here: {exc}")
    cache = None if args.no_cache else args.cache
    config = DemoConfig(seed=args.seed, bf16=not args.fp32)
    report = run(config, args.out, device, args.threads, force=args.force, cache=cache)
    for name, model in report["models"].items():
        verdict = "ok" if model["passed"] else "MISSED"
        logging.info(
            "%-10s %s = %.4f (bar %.2f) %s, %.0fs wall / %.0fs CPU",
            name,
            model["metric"],
            model["value"],
            model["bar"],
            verdict,
            model["wall_seconds"],
            model["cpu_seconds"],
        )
    logging.info("report: %s", args.out / "report.json")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
