"""One way to run a server subprocess: its own process group, a log file, readiness polling, a clean stop.

The stack's tritonserver, Prometheus and gateway are each a `ManagedProcess` that says only how
to tell it is ready (`is_ready`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self, TypeVar

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
        """Poll readiness; raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(
                    f"{self.label} exited with code {self.process.returncode}; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(self.poll_interval_s)
        raise TimeoutError(f"{self.label} not ready after {timeout_s}s; log {self.log_path}:\n{self.log_tail()}")

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the group, or the leader only), wait, then SIGKILL whatever is left of the group."""
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


def spawn(
    command: Sequence[str], log_path: Path, *, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` leading a new process group, stdin closed, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
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


def ready_or_killed(server: Server, timeout_s: float) -> Server:
    """`server` once it is ready; if it dies, times out or is interrupted, kill it and re-raise."""
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        server.kill()
        raise
    return server
