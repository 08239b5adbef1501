"""Fixtures that start real tritonservers (bundled in nvidia-pytriton) on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.triton import TritonServer
from tasks import MODELS
from tests.conftest import start_on_free_ports

__all__ = ["MODEL_LOAD_TIMEOUT_S", "start_on_free_ports"]  # tests/triton's modules import both from here

ROOT = Path(__file__).resolve().parents[2]
# Three python-backend stubs importing torch at once take a while on a busy 2-core machine.
MODEL_LOAD_TIMEOUT_S = 300.0


@pytest.fixture(scope="session")
def cpu_repository(model_repository: Path) -> Path:
    """The exported models behind Triton's python backend (CVSERVE_TEST_TRITON_CPU_REPOSITORY overrides)."""
    default = ROOT / "build" / "triton_cpu_repository"
    path = Path(os.environ.get("CVSERVE_TEST_TRITON_CPU_REPOSITORY", default)).resolve()
    missing = [m for m in MODELS if not (path / m / "config.pbtxt").is_file()]
    if missing:
        pytest.fail(f"{path} lacks {missing}: run `make models` (python -m export all) first")
    return path


@pytest.fixture(scope="package")
def cpu_triton(cpu_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tests/triton's tritonserver serving the exported models on CPU (python backend)."""
    server = start_on_free_ports(cpu_repository, tmp_path_factory.mktemp("cpu_triton"), MODEL_LOAD_TIMEOUT_S)
    yield server
    server.stop()
