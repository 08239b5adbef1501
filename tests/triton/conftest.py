"""Fixtures that start real tritonservers (bundled in nvidia-pytriton) on free ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack.triton import TritonServer, start_tritonserver
from tests.triton.tiny_models import write_tiny_repository


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, message: str, interval_s: float = 0.1) -> None:
    """Poll `condition` until it holds; fail the test with `message` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s: {message}")


def triton_metric(server: TritonServer, name: str, model: str) -> float:
    """Read one per-model counter from Triton's Prometheus endpoint."""
    text = httpx.get(server.metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # the parser renames counters' samples to <name>_total
            if family.name == name and sample.labels.get("model") == model:
                return sample.value
    raise KeyError(f"{name} for model {model} not in Triton's metrics")


def start_on_free_ports(repository: Path, work_dir: Path) -> TritonServer:
    """Start tritonserver on `repository` with three fresh ports and wait until it is ready."""
    return start_tritonserver(repository, free_port(), free_port(), free_port(), work_dir=work_dir)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repository(tmp_path_factory.mktemp("tiny_repository"))


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """One tritonserver serving the tiny models for the whole session."""
    server = start_on_free_ports(tiny_repository, tmp_path_factory.mktemp("tiny_triton"))
    yield server
    server.stop()
