"""Start and stop the servers the benchmark measures: each its own process group on a free loopback port."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reserved_free_port() -> int:
    """A free port outside the ranges the OS (ephemeral) and Ray (workers 10002-19999, Serve's direct
    ingress 30000-31000) hand out on their own: chosen now, it is still free when HAProxy binds it later."""
    for port in random.Random().sample(range(20000, 30000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-29999")


@dataclass
class ServerProcess:
    """A server started by the benchmark; `stop()` ends its whole process group."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the leader (it shuts its children down), wait up to `grace_s`, SIGKILL the group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, grace_s)
        try:  # whatever the leader left behind (Ray workers, LitServe workers) in its process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for error messages."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def start_server(
    name: str,
    command: list[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
) -> ServerProcess:
    """Run `command` in a new session, then poll `ready_path` until it answers 200.

    Raises RuntimeError with the log's tail if the process exits or is not ready in `timeout_s`.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(server.base_url + ready_path, timeout=2.0).status_code == 200:
                    log.info("%s ready at %s", name, server.base_url)
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    except BaseException:  # Ctrl-C or an error while waiting: leave no server behind
        server.stop()
        raise
    server.stop()
    raise RuntimeError(f"{name} not ready after {timeout_s:.0f}s:\n{server.log_tail()}")
