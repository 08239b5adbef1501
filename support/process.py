"""One way to run a server subprocess: its own process group, a log file, readiness polling, a clean stop.

The stack's tritonserver, Prometheus and gateway, the benchmark's servers and the servers tests start
are each a `ManagedProcess` that says only how to tell it is ready (`is_ready`); `HttpServer` is
one that is ready once an HTTP path answers 200.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self, TypeVar

import httpx

from support.waiting import wait_for

log = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    """A running server subprocess that leads its own process group, logging to `log_path`."""

    process: subprocess.Popen[bytes]
    log_path: Path

    label: ClassVar[str] = "server"
    poll_interval_s: ClassVar[float] = 0.2
    # SIGTERM the whole group on stop, or only the leader (which then shuts its children down itself)
    term_group: ClassVar[bool] = True
    stop_timeout_s: ClassVar[float] = 15.0  # how long stop() waits after SIGTERM before SIGKILL

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def is_ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, timeout_s: float) -> None:
        """Poll readiness; raise with the log tail if the process dies (RuntimeError) or time runs out."""

        def ready() -> bool:
            if not self.running():
                raise RuntimeError(
                    f"{self.label} exited with code {self.process.returncode}; log {self.log_path}:\n{self.log_tail()}"
                )
            return self.is_ready()

        wait_for(
            ready,
            timeout_s,
            lambda: f"{self.label} not ready; log {self.log_path}:\n{self.log_tail()}",
            self.poll_interval_s,
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (the group, or the leader only), wait `timeout_s` (`stop_timeout_s`), then SIGKILL
        whatever is left of the group."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.running():
            if self.term_group:
                self._signal_group(signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing its process group", self.label, timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group (the server and its children), as a crash would."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass
class HttpServer(ManagedProcess):
    """A server on 127.0.0.1:`port`, ready once GET `ready_path` answers 200. stop() SIGTERMs the
    leader only (it shuts its children down: Ray, LitServe's workers) and gives it a minute to drain."""

    port: int
    ready_path: str = "/ready"

    poll_interval_s: ClassVar[float] = 0.25
    term_group: ClassVar[bool] = False
    stop_timeout_s: ClassVar[float] = 60.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        """Whether `ready_path` answers 200 (refused while starting, or 503 until ready: not yet)."""
        try:
            return httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def spawn(
    command: Sequence[str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    append: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `command` leading a new process group, stdin closed, stdout and stderr to `log_path`
    (appended to, or a fresh file without `append`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log_file:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # own process group: stop()/kill() reach its children too
        )


Server = TypeVar("Server", bound=ManagedProcess)


def ready_or_ended(server: Server, timeout_s: float, *, drain: bool = False) -> Server:
    """`server` once it is ready; if it dies, times out or is interrupted, end it and re-raise.

    It is SIGKILLed, or with `drain` stopped (SIGTERM, its grace, SIGKILL) so that it can clean up
    after itself (a gateway killed outright leaves its private directory behind).
    """
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        if drain:
            server.stop()
        else:
            server.kill()
        raise
    return server


def start_server(
    name: str,
    command: list[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
) -> HttpServer:
    """Run `command` (logging to `<log_dir>/<name>.log`) and return it once GET `ready_path` answers 200.

    Raises RuntimeError (it exited) or TimeoutError (not ready in `timeout_s`) with the log's tail;
    on those, and on Ctrl-C while waiting, the server is stopped first.
    """
    log_path = log_dir / f"{name}.log"
    process = spawn(command, log_path, env=env, append=False)
    server = ready_or_ended(HttpServer(process, log_path, port, ready_path), timeout_s, drain=True)
    log.info("%s ready at %s", name, server.url)
    return server
