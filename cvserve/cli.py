"""Classify, detect or segment image files with a running cvserve gateway.

  cvserve detect street.png --annotate boxes.png
  cvserve classify cat.jpg --top-k 3 --json
  cvserve segment a.png b.png --polygons --polygon-tolerance 2
  cvserve models            (what the gateway serves)
  cvserve ready             (exit 0 once it answers, 1 while it warms up or its backend is down)
  cvserve admin load classifier --version 2      (model versions: needs the admin key)
  cvserve admin candidate classifier --version 3 --mode shadow --share 0.2
  cvserve admin summary · cvserve admin rollback classifier · cvserve admin index

The gateway is --url (default: $CVSERVE_URL, else http://127.0.0.1:8000); the API key --api-key or
$CVSERVE_API_KEY; `admin` sends the admin key, --admin-key or $CVSERVE_ADMIN_KEY. Exit status: 0 answered, 1 the gateway refused or could not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from cvserve.client import DEFAULT_URL, URL_ENV, AnnotatedAnswer, Client, CvserveError, ImageFormat
from service.schemas import (
    ClassificationResult,
    ClassifyResponse,
    DetectionResult,
    DetectResponse,
    SegmentationResult,
    SegmentResponse,
)

TaskResponse = ClassifyResponse | DetectResponse | SegmentResponse


def build_parser() -> argparse.ArgumentParser:
    """The `cvserve` command line: one subcommand per task, each with that task's options."""
    parser = argparse.ArgumentParser(
        prog="cvserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url", help="the gateway's base URL (default: $CVSERVE_URL or http://127.0.0.1:8000)"
    )
    server.add_argument("--api-key", help="the gateway's API key (default: $CVSERVE_API_KEY)")
    server.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)"
    )
    common = argparse.ArgumentParser(add_help=False, parents=[server])
    common.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="image files (JPEG, PNG, WebP, ...)"
    )
    common.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    common.add_argument(
        "--annotate",
        type=Path,
        metavar="OUT",
        help="also write the answer drawn on the image to OUT (with several files: OUT-0, OUT-1, ...)",
    )
    common.add_argument(
        "--format",
        choices=("png", "jpeg"),
        help="the drawn image's format (default: from OUT's suffix, else png)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print the gateway's JSON answers (one line per request) instead of a summary",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    classify = tasks.add_parser("classify", parents=[common], help="the top-k classes of each image")
    classify.add_argument("--top-k", type=int, help="how many classes to print (gateway default 5)")
    detect = tasks.add_parser("detect", parents=[common], help="boxes, labels and scores")
    detect.add_argument(
        "--score-threshold", type=float, help="drop detections below this score (default 0.5)"
    )
    detect.add_argument("--max-detections", type=int, help="at most this many per image (default 100)")
    segment = tasks.add_parser("segment", parents=[common], help="per-class masks and pixel fractions")
    segment.add_argument("--polygons", action="store_true", help="also ask for each class's polygons")
    segment.add_argument(
        "--polygon-tolerance", type=float, help="polygon simplification in pixels (default 1)"
    )
    models = tasks.add_parser("models", parents=[server], help="the models the gateway serves")
    models.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    tasks.add_parser("ready", parents=[server], help="whether the gateway is ready (exit 0) or not (exit 1)")
    admin = tasks.add_parser(
        "admin", parents=[server], help="model versions: load, unload, rollback, candidate, promote, summary, index"
    )
    admin.add_argument("action", choices=ADMIN_ACTIONS, help="what to do (prints the gateway's JSON answer)")
    admin.add_argument("model", nargs="?", help="the model (every action but index and summary)")
    admin.add_argument("--version", help="load: the version (default: the repository's highest); unload, candidate")
    admin.add_argument("--no-activate", action="store_true", help="load: load only, keep the current version")
    admin.add_argument("--mode", choices=("shadow", "canary"), default="shadow", help="candidate (default shadow)")
    admin.add_argument("--share", type=float, default=0.1, help="candidate: share of traffic, 0..1 (default 0.1)")
    admin.add_argument("--clear", action="store_true", help="candidate: stop shadowing or canarying")
    admin.add_argument("--admin-key", help="the gateway's admin key (default: $CVSERVE_ADMIN_KEY)")
    return parser


ADMIN_ACTIONS = ("index", "load", "unload", "rollback", "candidate", "promote", "summary")
ADMIN_KEY_ENV = "CVSERVE_ADMIN_KEY"


def admin_request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body) of an `admin` action; ValueError for a missing model or version."""
    if args.action == "index":
        return "POST", "/admin/repository/index", None
    if args.action == "summary" and args.model is None:
        return "GET", "/admin/candidate/summary", None
    if args.model is None:
        raise ValueError(f"admin {args.action} needs a model")
    models = f"/admin/repository/models/{args.model}"
    if args.action == "summary":
        return "GET", f"{models}/candidate", None
    if args.action == "load":
        return "POST", f"{models}/load", {"version": args.version, "activate": not args.no_activate}
    if args.action in ("rollback", "promote"):
        return "POST", f"{models}/{args.action}", None
    if args.action == "candidate" and args.clear:
        return "DELETE", f"{models}/candidate", None
    if args.version is None:
        raise ValueError(f"admin {args.action} needs --version")
    if args.action == "unload":
        return "POST", f"{models}/unload", {"version": args.version}
    return "PUT", f"{models}/candidate", {"version": args.version, "mode": args.mode, "share": args.share}


def run_admin(args: argparse.Namespace) -> tuple[str, int]:
    """One admin call: the gateway's JSON answer and exit status 0, or its error and 1."""
    method, path, body = admin_request(args)
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    key = args.admin_key if args.admin_key is not None else os.environ.get(ADMIN_KEY_ENV)
    headers = {"X-Admin-Key": key} if key else {}
    try:
        response = httpx.request(method, url + path, json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as error:
        return f"cannot reach {url}: {error}", 1
    if response.is_success:
        return json.dumps(response.json(), indent=2), 0
    try:
        error_body = response.json()["error"]
        return f"{response.status_code} {error_body['code']}: {error_body['message']}", 1
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:500]}", 1


def describe(args: argparse.Namespace) -> tuple[list[str], int]:
    """`cvserve models` and `cvserve ready`: lines to print and the exit status."""
    with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        if args.task == "ready":
            ready = client.ready()
            return [
                f"{'ready' if ready.ready else 'not ready'} ({ready.backend} backend)"
            ], 0 if ready.ready else 1
        answer = client.models()
    if args.json:
        return [answer.model_dump_json()], 0
    return [
        f"{m.name:<12} {m.task:<15} {m.endpoint:<10} {m.input_size.width}x{m.input_size.height}  "
        f"{len(m.labels)} labels  {m.backend}, weights {m.weights}, batches up to {m.max_batch_size}"
        for m in answer.models
    ], 0


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen task's options, as the client's keyword arguments (unset ones left to the gateway)."""
    if args.task == "classify":
        return {"top_k": args.top_k}
    if args.task == "detect":
        return {"score_threshold": args.score_threshold, "max_detections": args.max_detections}
    return {"return_polygons": args.polygons or None, "polygon_tolerance": args.polygon_tolerance}


def annotate_format(args: argparse.Namespace) -> ImageFormat | None:
    if args.annotate is None:
        return None
    if args.format is not None:
        return args.format
    return "jpeg" if args.annotate.suffix.lower() in (".jpg", ".jpeg") else "png"


def annotated_paths(out: Path, count: int) -> list[Path]:
    """Where the drawn images go: OUT itself for one file, else OUT-0, OUT-1, ... with OUT's suffix."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def summary(name: str, result: ClassificationResult | DetectionResult | SegmentationResult) -> list[str]:
    """Readable lines about one image's answer."""
    head = f"{name}  {result.image.width}x{result.image.height}"
    if isinstance(result, ClassificationResult):
        return [head + "  " + ", ".join(f"{p.label} {p.score:.3f}" for p in result.predictions)]
    if isinstance(result, DetectionResult):
        lines = [f"{head}  {len(result.detections)} detection{'s' * (len(result.detections) != 1)}"]
        lines += [
            f"  {d.label:<12} {d.score:.3f}  [{', '.join(f'{v:.1f}' for v in d.box)}]"
            for d in result.detections
        ]
        return lines
    lines = [f"{head}  {len(result.segments)} class{'es' * (len(result.segments) != 1)} present"]
    for segment in result.segments:
        line = f"  {segment.label:<12} {segment.pixel_fraction:7.2%}"
        if segment.polygons is not None:
            vertices = sum(len(p.exterior) + sum(len(h) for h in p.holes) for p in segment.polygons)
            line += (
                f"  {len(segment.polygons)} polygon{'s' * (len(segment.polygons) != 1)}, {vertices} vertices"
            )
        lines.append(line)
    return lines


def run(args: argparse.Namespace) -> list[str]:
    """Send the files in batches; write drawn images if asked; return what to print."""
    fmt = annotate_format(args)
    method = {"classify": Client.classify, "detect": Client.detect, "segment": Client.segment}[args.task]
    outputs = annotated_paths(args.annotate, len(args.files)) if args.annotate is not None else []
    printed: list[str] = []
    with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        for start in range(0, len(args.files), args.batch):
            files = args.files[start : start + args.batch]
            answer = method(client, files, annotate=fmt, **task_options(args))
            response: TaskResponse = answer.response if isinstance(answer, AnnotatedAnswer) else answer
            if isinstance(answer, AnnotatedAnswer):
                for path, image in zip(outputs[start : start + len(files)], answer.images, strict=True):
                    path.write_bytes(image)
            if args.json:
                printed.append(response.model_dump_json())
            else:
                for file, result in zip(files, response.results, strict=True):
                    printed.extend(summary(str(file), result))
    printed += [f"wrote {path}" for path in outputs]
    return printed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cvserve` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "admin":
        try:
            text, status = run_admin(args)
        except ValueError as error:
            parser.error(str(error))
        print(text, file=sys.stderr if status else sys.stdout)
        return status
    if args.task in ("models", "ready"):
        try:
            lines, status = describe(args)
        except CvserveError as error:
            print(f"cvserve: {error}", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return status
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        lines = run(args)
    except CvserveError as error:
        print(f"cvserve: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # an output path that cannot be written
        print(f"cvserve: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
