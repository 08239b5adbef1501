"""CPU per request in the Ray-free owner app, with JPEGs decoded by the HTTP workers or by the model owner.

The GPU check's HTTP step (loadtests/gpu/http.py) runs one model owner and several uvicorn workers; on a
GPU the workers' CPU is what bounds /classify end to end. This runs the same processes here on the CPU,
once with `CVSERVE_DEVICE_DECODE=off` (workers decode and preprocess, arrays travel to the owner) and
once with `on` (workers read the JPEG header, the file travels, the owner decodes in its batches), and
reports CPU milliseconds per answered request for the workers, the owner and the load generator, read
from each process tree before and after the load (psutil).

    python -m loadtests.owner_split --model classifier --out loadtests/owner-split-2026-12-05.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from loadtests.gpu.http import (
    ENDPOINTS, _free_port, _http_ready, _owner_decoded, _owner_ready, _stop, _wait_for, load, tree_cpu_s, warm,
)  # fmt: skip

log = logging.getLogger("loadtests.owner_split")


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (the load generator's processes, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: argparse.Namespace, mode: str, logs: Path) -> dict[str, Any]:
    """One owner and `args.servers` workers with `CVSERVE_DEVICE_DECODE=mode`, loaded for `args.seconds`."""
    socket_path = Path(tempfile.mkdtemp(prefix="cvserve-", dir="/tmp")) / "owner.sock"
    port = _free_port()
    env = {
        **os.environ,
        "CVSERVE_MODEL_REPOSITORY": str(args.repository),
        "CVSERVE_MODELS": args.model,
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_MAX_BATCH_SIZE": str(args.max_batch),
        "CVSERVE_OWNER_SOCKET": str(socket_path),
        "CVSERVE_HOST": "127.0.0.1",
        "CVSERVE_DEVICE_DECODE": mode,
    }
    owner = subprocess.Popen(
        [sys.executable, "-m", "service.owner_app", "--socket", str(socket_path)],
        env=env, stdout=open(logs / f"owner-{mode}.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    servers = None
    try:
        _wait_for(lambda: _owner_ready(socket_path), owner, "the model owner", 300)
        servers = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.owner_app:from_environment", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(args.servers), "--no-access-log", "--log-level", "warning",
             "--http", args.http, "--loop", args.loop],
            env=env, stdout=open(logs / f"servers-{mode}.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _http_ready(f"{url}/ready"), servers, "the uvicorn workers", 120)
        warm(url + ENDPOINTS[args.model], 4 * args.servers, args.image)
        before = (tree_cpu_s([owner.pid]), tree_cpu_s([servers.pid]), children_cpu_s(), time.monotonic())
        measured = load(url + ENDPOINTS[args.model], args.client_processes, args.clients, args.seconds, 0.0, args.image)
        after = (tree_cpu_s([owner.pid]), tree_cpu_s([servers.pid]), children_cpu_s(), time.monotonic())
        decoded = _owner_decoded(socket_path)
    finally:
        if servers is not None:
            _stop(servers)
        _stop(owner)
    answered = max(1, measured["ok"])
    per_request = {
        name: round(1000 * (after[i] - before[i]) / answered, 2)
        for i, name in enumerate(("owner", "workers", "load_generator"))
    }
    return {
        "device_decode": mode,
        **measured,
        "cpu_ms_per_request": per_request,
        "wall_s": round(after[3] - before[3], 1),
        "decoded": decoded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.owner_split", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="classifier", choices=sorted(ENDPOINTS))
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--servers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients in all")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--image", type=lambda s: [int(v) for v in s.split("x")], default=[640, 480], help="WxH")
    parser.add_argument("--modes", default="off,on", help="CVSERVE_DEVICE_DECODE values, in order")
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"), help="uvicorn's parser")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="uvicorn's loop")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the warm-up's requests, one line each
    logs = Path(tempfile.mkdtemp(prefix="owner-split-"))
    rows = []
    for mode in args.modes.split(","):
        row = measure(args, mode, logs)
        log.info("%s", json.dumps(row))
        rows.append(row)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": psutil.cpu_count(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "logs": str(logs),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
