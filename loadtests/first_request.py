"""First-request latency after the gateway reports ready, with and without warm-up at every batch size.

Each measurement runs in a fresh Python process (TorchScript's per-shape optimisation state is
per process): build the API over the embedded backend (`create_api` + `LocalBackend`, the same code
`make serve` runs in its replica), check `/ready` is 200, then time the first request for one model
and the median of the next ten. Run: `python -m loadtests.first_request` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tasks import TASKS

MODELS = {model: task.endpoint for model, task in TASKS.items()}


def measure(model: str, warm_up: bool, repository: Path) -> dict[str, float]:
    """In this process: first and steady latency (ms) of `model` after /ready, and the start-up time (s)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from service.app import create_api
    from service.backends.local import LocalBackend
    from service.settings import Settings
    from training.shapes import make_scene

    settings = Settings(model_repository=repository, models=(model,), device="cpu", warm_up_batch_sizes=warm_up)
    began = time.perf_counter()
    api = create_api(settings, LocalBackend(settings))
    startup_s = time.perf_counter() - began
    images = []
    for seed in range(11):
        buffer = io.BytesIO()
        Image.fromarray(make_scene(900_000 + seed, 160, 1, 3).image).save(buffer, "PNG")
        images.append(buffer.getvalue())
    with TestClient(api) as client:
        assert client.get("/ready").status_code == 200
        times = []
        for data in images:
            started = time.perf_counter()
            response = client.post(MODELS[model], content=data, headers={"Content-Type": "image/png"})
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
    return {"first_ms": times[0], "steady_ms": statistics.median(times[1:]), "startup_s": startup_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WARM_UP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process: one measurement, as JSON
        print(json.dumps(measure(args.one[0], args.one[1] == "1", args.repository.resolve())))
        return 0
    print("| model | warm-up | start-up (s) | first request (ms) | steady median (ms) | first / steady |")
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        for warm_up in (False, True):
            child = [sys.executable, "-m", "loadtests.first_request", "--repository", str(args.repository)]
            out = subprocess.run([*child, "--one", model, "1" if warm_up else "0"], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            m = json.loads(out.stdout.strip().splitlines()[-1])
            label = "every batch size x2" if warm_up else "one batch of 1"
            print(
                f"| {model} | {label} | {m['startup_s']:.1f} | {m['first_ms']:.0f} | {m['steady_ms']:.0f} | "
                f"{m['first_ms'] / m['steady_ms']:.1f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
