"""Run the tritonserver bundled in the nvidia-pytriton wheel (CPU, python backend) without Docker.

`start_tritonserver(...)` starts it in its own process group, logs to a file and waits until it
is ready; `python -m stack.triton --repository build/triton_cpu_repository` runs it in the
foreground (Ctrl-C stops it). With `trace_url` (`--trace-url`) it sends OpenTelemetry spans of
every request there over OTLP/HTTP, as children of the caller's `traceparent` when one comes along.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytriton
import tritonclient.http as triton_http

from service.backends.triton import TRITON_ADMIN_HEADER, TRITON_KEEPALIVE_FLAGS
from support.process import ManagedProcess, ready_or_ended, spawn

log = logging.getLogger(__name__)

# Management APIs nobody outside the operator needs: guarded by a header the launcher makes up.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = TRITON_ADMIN_HEADER  # the header the gateway sends with CVSERVE_TRITON_ADMIN_TOKEN


def _pytriton_dir() -> Path:
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def _libs_dir() -> Path:
    """The wheel's vendored shared libraries (auditwheel puts them next to the package)."""
    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def tritonserver_binary() -> Path:
    """Path of the bundled tritonserver executable."""
    return _pytriton_dir() / "bin" / "tritonserver"


def prepare_backend_directory(target: Path) -> Path:
    """Lay out `<target>/python/` with the python backend and the stub for this interpreter.

    The python backend looks for `triton_python_backend_stub` next to its own .so, and the wheel
    ships one stub per Python version, so the matching one is copied in.
    """
    source = _pytriton_dir()
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = {
        source / "backends" / "python" / "libtriton_python.so": python_dir / "libtriton_python.so",
        source / "backends" / "python" / "triton_python_backend_utils.py": (
            python_dir / "triton_python_backend_utils.py"
        ),
        source / "python_backend_stubs" / version / "triton_python_backend_stub": (
            python_dir / "triton_python_backend_stub"
        ),
    }
    for src, dst in files.items():
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target


def trace_flags(url: str, rate: int = 1) -> list[str]:
    """tritonserver flags that export OpenTelemetry spans (timestamps of each request) to `url` (OTLP/HTTP).

    Triton traces every request that carries a trace context, and one in `rate` of the others; it
    sends spans every half second (its default is 5 s)."""
    return [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={url}",
        "--trace-config=opentelemetry,bsp_schedule_delay=500",
        f"--trace-config=rate={rate}",
        "--trace-config=level=TIMESTAMPS",
    ]


def server_command(
    repository: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    backend_directory: Path,
    admin_token: str,
    log_verbose: int = 0,
    trace_url: str | None = None,
    model_control: str = "none",
) -> list[str]:
    """The tritonserver command line: static repository (or `model_control="explicit"`: every model loaded
    at start, then versions loaded and unloaded through the restricted repository API, as the gateway's
    /admin does), strict configs, exit on load errors; traces to `trace_url` if given."""
    restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_token}"
    control = ["--model-control-mode=none"]
    if model_control == "explicit":
        control = ["--model-control-mode=explicit", "--load-model=*"]
    elif model_control != "none":
        raise ValueError(f"model_control must be 'none' or 'explicit', got {model_control!r}")
    return [
        str(tritonserver_binary()),
        f"--model-repository={repository}",
        *control,
        # 2.51 deprecates --strict-model-config=true in favour of this flag (same meaning).
        "--disable-auto-complete-config",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--backend-directory={backend_directory}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--metrics-interval-ms=500",
        f"--http-restricted-api={restriction}",
        f"--grpc-restricted-protocol={restriction}",
        "--exit-timeout-secs=5",
        f"--log-verbose={log_verbose}",
        *TRITON_KEEPALIVE_FLAGS,
        *(trace_flags(trace_url) if trace_url else ()),
    ]


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: vendored libs, and this venv's python first on PATH.

    The python backend's stub process imports torch/numpy from whatever `python` it finds, so
    the model's `model.py` runs with the same packages as the gateway.
    """
    env = dict(os.environ)
    libs = str(_libs_dir())
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@dataclass
class TritonServer(ManagedProcess):
    """A running tritonserver subprocess (own process group) and the ports it listens on."""

    repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    admin_token: str = field(repr=False)

    label: ClassVar[str] = "tritonserver"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Headers that unlock the restricted management APIs (gRPC prefixes the key)."""
        key = ADMIN_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_HEADER}"
        return {key: self.admin_token}

    def is_ready(self) -> bool:
        """Whether the server answers ready (all models loaded, strict readiness)."""
        try:
            with triton_http.InferenceServerClient(self.http_url, connection_timeout=1.0) as client:
                return client.is_server_live() and client.is_server_ready()
        except Exception:  # connection refused / reset while starting: simply not ready yet
            return False


def start_tritonserver(
    repository: Path | str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    *,
    work_dir: Path | str | None = None,
    admin_token: str | None = None,
    wait: bool = True,
    ready_timeout_s: float = 120.0,
    log_verbose: int = 0,
    trace_url: str | None = None,
    model_control: str = "none",
) -> TritonServer:
    """Start tritonserver on `repository`; by default return once it reports ready.

    `work_dir` holds the backend directory and `tritonserver.log` (a fresh temp dir if None);
    `trace_url` (an OTLP/HTTP traces URL) switches its OpenTelemetry tracing on.
    """
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} not found: run the export first")
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="cvserve-triton-"))
    work.mkdir(parents=True, exist_ok=True)
    backends = prepare_backend_directory(work / "backends")
    token = admin_token or secrets.token_urlsafe(24)
    command = server_command(
        repository, http_port, grpc_port, metrics_port, backends, token, log_verbose, trace_url=trace_url,
        model_control=model_control,
    )  # fmt: skip
    log_path = work / "tritonserver.log"
    log.info("starting tritonserver (http %d, grpc %d, metrics %d), log %s", http_port, grpc_port,
             metrics_port, log_path)
    process = spawn(command, log_path, cwd=work, env=server_environment())
    server = TritonServer(
        process=process,
        log_path=log_path,
        repository=repository,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        admin_token=token,
    )
    return ready_or_ended(server, ready_timeout_s) if wait else server


def main(argv: list[str] | None = None) -> int:
    """Run tritonserver in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("build/triton_cpu_repository"))
    parser.add_argument("--http-port", type=int, default=8010)
    parser.add_argument("--grpc-port", type=int, default=8011)
    parser.add_argument("--metrics-port", type=int, default=8012)
    parser.add_argument("--work-dir", type=Path, default=Path("build/tritonserver"))
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--trace-url", help="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    server = start_tritonserver(
        args.repository, args.http_port, args.grpc_port, args.metrics_port,
        work_dir=args.work_dir, log_verbose=args.log_verbose, trace_url=args.trace_url,
    )
    log.info("tritonserver ready: http %s grpc %s metrics %s", server.http_url, server.grpc_url,
             server.metrics_url)
    token_file = args.work_dir / "admin-token"
    token_file.touch(mode=0o600)
    token_file.write_text(server.admin_token + "\n")
    log.info("restricted APIs (%s) need header %s with the token in %s (gRPC: prefix triton-grpc-protocol-)",
             ",".join(RESTRICTED_APIS), ADMIN_HEADER, token_file)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while server.running():
            time.sleep(0.5)
        log.error("tritonserver exited with code %s; log %s", server.process.returncode, server.log_path)
        return server.process.returncode or 1
    except KeyboardInterrupt:
        log.info("stopping tritonserver")
        server.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
