"""How many requests per second one model owner can answer from one core when its model costs nothing.

On a GPU the owner's model and decode run on the device, so what can bound /classify end to end is the
owner process's own CPU: reading frames, unpacking images, its batcher, launching, packing answers, on
one event loop. This measures that part here on the CPU. The owner (`python -m service.owner_app
--socket`) serves a copy of a model's contract whose `model.pt` is a null TorchScript module (the same
input and output shapes, almost no arithmetic), with `CVSERVE_DEVICE_DECODE=off`: images travel as the
model's uint8 arrays, as they would after the owner's decode. Client processes talk the owner's socket
protocol directly (no HTTP: the workers' share is measured by loadtests/owner_split.py), each keeping
`--depth` requests outstanding. Reported: answered requests/s, the owner's CPU ms per request (psutil,
before and after the load), its batch sizes. `--real` serves the model itself instead, for scale.

    python -m loadtests.owner_capacity --model classifier --input 224 --out loadtests/owner-capacity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from loadtests.gpu.http import _owner_ready, _stop, _wait_for, tree_cpu_s
from service.backends.owner import _LENGTH, pack_array, read_frame

log = logging.getLogger("loadtests.owner_capacity")


def null_repository(source: Path, model: str, target: Path, max_batch: int, size: int | None) -> Path:
    """`source/model`'s contract in `target`, its `model.pt` a null module with the same output shapes, its
    batch limit `max_batch`, and its input `size`×`size` when given. Returns the model's folder."""
    import torch

    from service.backends.torchscript import quiet_jit
    from service.contract import load_contract

    folder = target / model
    (folder / "1").mkdir(parents=True)
    config = (source / model / "config.pbtxt").read_text()
    config = re.sub(r"max_batch_size: \d+", f"max_batch_size: {max_batch}", config)
    config = re.sub(r"model_warmup \{.*", "", config, flags=re.S)  # warm-up: the owner's own, by bucket
    if size is not None:
        config = re.sub(r"(input \{.*?dims: 3\s+dims: )\d+(\s+dims: )\d+", rf"\g<1>{size}\g<2>{size}", config,
                        count=1, flags=re.S)  # fmt: skip
        config = re.sub(r'(key: "resize_size"\s+value \{\s+string_value: ")\d+', rf"\g<1>{size}", config)
    (folder / "config.pbtxt").write_text(config)
    for extra in source.joinpath(model).glob("*.txt"):
        shutil.copy(extra, folder / extra.name)
    shutil.copy(source / model / "1" / "version.json", folder / "1" / "version.json")
    contract = load_contract(target, model)
    widths = [int(np.prod(spec.dims)) for spec in contract.outputs]

    class Null(torch.nn.Module):
        def __init__(self, widths: list[int]) -> None:
            super().__init__()
            self.widths = widths

        def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
            first = images[:, 0, 0, 0].float().unsqueeze(1)
            return [first.expand(-1, width).contiguous() for width in self.widths]

    shapes = [tuple(spec.dims) for spec in contract.outputs]
    with quiet_jit():
        torch.jit.save(torch.jit.script(Null(widths)), str(folder / "1" / "model.pt"))
    return folder if all(len(shape) == 1 for shape in shapes) else _refuse(shapes)


def _refuse(shapes: list[tuple[int, ...]]) -> Path:
    raise SystemExit(f"the null module gives flat outputs only; this model's are {shapes}")


def client(path: str, model: str, image: np.ndarray, depth: int, seconds: float, go: Any, queue: Any) -> None:
    """Connect, say so on `queue`, and once `go` is set keep `depth` requests of one image outstanding for
    `seconds`; then put the count of answers, errors and the batch sizes seen on `queue`."""

    async def run() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 30)
        queue.put("connected")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        # The frame's map, packed once but for its id (the owner reads the same frame as `frame` writes).
        keys = ("op", "infer", "model", model, "images")
        rest = b"".join(msgpack.packb(x, use_bin_type=True) for x in keys)
        rest += msgpack.packb([pack_array(image)], use_bin_type=True)
        ids = iter(range(1 << 62))
        answered = errors = 0
        batches: dict[int, int] = {}

        def send() -> None:
            payload = b"\x84" + msgpack.packb("id") + msgpack.packb(next(ids)) + rest
            writer.write(_LENGTH.pack(len(payload)) + payload)

        for _ in range(depth):
            send()
        deadline = time.monotonic() + seconds
        outstanding = depth
        while outstanding:
            reply = await read_frame(reader)
            if reply is None:
                break
            outstanding -= 1
            if "error" in reply:
                errors += 1
            else:
                answered += 1
                size = int(reply["timings"][0][2])
                batches[size] = batches.get(size, 0) + 1
            if time.monotonic() < deadline:
                send()
                outstanding += 1
        writer.close()
        return {"answered": answered, "errors": errors, "batches": batches}

    queue.put(asyncio.run(run()))


def measure(args: argparse.Namespace, repository: Path, logs: Path) -> dict[str, Any]:
    socket_path = Path(tempfile.mkdtemp(prefix="cvserve-", dir="/tmp")) / "owner.sock"
    env = {
        **os.environ,
        "CVSERVE_MODEL_REPOSITORY": str(repository),
        "CVSERVE_MODELS": args.model,
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_DEVICE_DECODE": "off",
        "CVSERVE_MAX_BATCH_SIZE": str(args.max_batch),
        "CVSERVE_MAX_ONGOING_REQUESTS": str(max(64, args.max_batch)),
    }
    with open(logs / "owner.log", "w") as owner_log:
        command = [sys.executable, "-m", "service.owner_app", "--socket", str(socket_path), "--loop", args.loop]
        owner = subprocess.Popen(command,
                                 env=env, stdout=owner_log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for(lambda: _owner_ready(socket_path), owner, "the model owner", 300)
        from service.contract import load_contract

        dims = load_contract(repository, args.model).inputs[0].dims
        image = np.random.default_rng(0).integers(0, 256, dims, dtype=np.uint8)
        context = multiprocessing.get_context("spawn")
        results = []
        for seconds, record in ((args.warm, False), (args.seconds, True)):  # warm round, measured round
            queue, go = context.Queue(), context.Event()
            load = (str(socket_path), args.model, image, args.depth, seconds, go, queue)
            workers = [context.Process(target=client, args=load) for _ in range(args.clients)]
            for worker in workers:
                worker.start()
            for _ in workers:  # the clients' start (spawn imports, connecting) outside the window
                if queue.get(timeout=120) != "connected":
                    raise RuntimeError("a client did not connect")
            cpu_before, started = tree_cpu_s([owner.pid]), time.monotonic()
            go.set()
            rounds = [queue.get(timeout=seconds + 120) for _ in workers]
            elapsed, cpu = time.monotonic() - started, tree_cpu_s([owner.pid]) - cpu_before
            for worker in workers:
                worker.join()
            if record:
                results = rounds
        answered = sum(r["answered"] for r in results)
        batches: dict[int, int] = {}
        for r in results:
            for size, count in r["batches"].items():
                batches[size] = batches.get(size, 0) + count
        return {
            "requests_per_s": round(answered / elapsed, 1),
            "owner_cpu_ms_per_request": round(1000 * cpu / max(answered, 1), 4),
            "owner_cpu_cores": round(cpu / elapsed, 3),
            "errors": sum(r["errors"] for r in results),
            "seconds": round(elapsed, 2),
            "batch_sizes": dict(sorted(batches.items())),
            "mean_batch": round(sum(s * c for s, c in batches.items()) / max(sum(batches.values()), 1), 2),
        }
    finally:
        _stop(owner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="classifier")
    parser.add_argument("--input", type=int, default=None, help="square input size for the null model")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--clients", type=int, default=1, help="client processes (connections)")
    parser.add_argument("--depth", type=int, default=256, help="requests outstanding per client")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm", type=float, default=2.0, help="seconds of load before the measured round")
    parser.add_argument("--real", action="store_true", help="serve the model itself, not a null module")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="the owner's loop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="owner-capacity-"))
    if args.real:
        repository = args.repository.resolve()
    else:
        repository = work / "repository"
        null_repository(args.repository, args.model, repository, args.max_batch, args.input)
    result = {
        "model": args.model, "null_model": not args.real, "input": args.input, "max_batch": args.max_batch,
        "clients": args.clients, "depth": args.depth, "loop": args.loop, "cpu": os.cpu_count(),
        **measure(args, repository, work),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
