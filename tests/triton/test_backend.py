"""TritonBackend against a real tritonserver (tiny python-backend models), over gRPC and HTTP."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from service.backends.base import BackendTimeout, BackendUnavailable
from service.backends.triton import TritonBackend
from service.settings import Settings
from stack.triton import TritonServer, start_tritonserver
from support.ports import free_port
from support.triton_metrics import triton_metric
from support.waiting import wait_for
from tests.triton.conftest import start_on_free_ports
from tests.triton.tiny_models import IMAGE_DIMS

PROTOCOLS = ["grpc", "http"]


def url_for(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def make_backend(
    repository: Path, url: str, protocol: str, timeout_s: float = 5.0, models: tuple[str, ...] = ("echo", "slow")
) -> TritonBackend:
    settings = Settings(
        backend="triton", triton_url=url, triton_protocol=protocol, request_timeout_s=timeout_s,
        model_repository=repository,
    )
    return TritonBackend(settings, models=models)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, IMAGE_DIMS, dtype=np.uint8)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_returns_outputs_without_batch_dim(tiny_triton: TritonServer, tiny_repository: Path, protocol: str) -> None:
    async def scenario() -> None:
        backend = make_backend(tiny_repository, url_for(tiny_triton, protocol), protocol)
        try:
            assert await backend.ready()
            for seed in range(3):
                outputs = await backend.infer("echo", image(seed))
                assert set(outputs) == {"SUM", "BATCH"}
                assert outputs["SUM"].shape == (1,) and outputs["SUM"].dtype == np.float32
                assert outputs["SUM"][0] == float(image(seed).sum(dtype=np.int64))
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_calls_are_batched_by_triton(tiny_triton: TritonServer, tiny_repository: Path, protocol: str) -> None:
    before = {name: triton_metric(tiny_triton.metrics_url, name, "echo") for name in ("nv_inference_count", "nv_inference_exec_count")}

    async def scenario() -> list[dict[str, np.ndarray]]:
        backend = make_backend(tiny_repository, url_for(tiny_triton, protocol), protocol)
        try:
            return await asyncio.gather(*(backend.infer("echo", image(seed)) for seed in range(16)))
        finally:
            await backend.close()

    results = asyncio.run(scenario())
    assert [r["SUM"][0] for r in results] == [float(image(seed).sum(dtype=np.int64)) for seed in range(16)]
    assert max(int(r["BATCH"][0]) for r in results) > 1, "the model never saw a batch larger than 1"

    def counted() -> bool:
        return triton_metric(tiny_triton.metrics_url, "nv_inference_count", "echo") - before["nv_inference_count"] >= 16

    wait_for(counted, 10, "Triton's metrics never counted the 16 inferences")
    inferences = triton_metric(tiny_triton.metrics_url, "nv_inference_count", "echo") - before["nv_inference_count"]
    executions = triton_metric(tiny_triton.metrics_url, "nv_inference_exec_count", "echo") - before["nv_inference_exec_count"]
    assert executions < inferences


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_call_over_its_deadline_raises_backend_timeout(
    tiny_triton: TritonServer, tiny_repository: Path, protocol: str
) -> None:
    async def scenario() -> float:
        backend = make_backend(tiny_repository, url_for(tiny_triton, protocol), protocol, timeout_s=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(BackendTimeout, match="did not answer within 0.3 s"):
                await backend.infer("slow", image(0))  # sleeps 1 s inside the model
            elapsed = time.monotonic() - started
            assert await backend.ready(), "a short request deadline must not make readiness fail"
            return elapsed
        finally:
            await backend.close()

    assert asyncio.run(scenario()) < 0.9


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_image_shape_is_refused_before_sending(tiny_triton: TritonServer, tiny_repository: Path, protocol: str) -> None:
    async def scenario() -> None:
        backend = make_backend(tiny_repository, url_for(tiny_triton, protocol), protocol)
        try:
            with pytest.raises(ValueError, match=r"expects uint8\[3, 8, 8\]"):
                await backend.infer("echo", np.zeros((3, 9, 8), np.uint8))
            with pytest.raises(KeyError, match="unknown model"):
                await backend.infer("nope", image(0))
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_triton_absent_means_not_ready_and_unavailable(tiny_repository: Path, protocol: str) -> None:
    async def scenario() -> None:
        backend = make_backend(tiny_repository, f"127.0.0.1:{free_port()}", protocol)
        try:
            assert not await backend.ready()
            with pytest.raises(BackendUnavailable) as raised:
                await backend.infer("echo", image(0))
            assert "Triton" in str(raised.value) and "echo" in str(raised.value)
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_model_triton_does_not_serve_is_unavailable(
    tiny_triton: TritonServer, tiny_repository: Path, tmp_path: Path, protocol: str
) -> None:
    contracts = tmp_path / "contracts"
    shutil.copytree(tiny_repository / "echo", contracts / "echo")
    shutil.copytree(tiny_repository / "echo", contracts / "ghost")
    config = contracts / "ghost" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "echo"', 'name: "ghost"'))

    async def scenario() -> None:
        backend = make_backend(contracts, url_for(tiny_triton, protocol), protocol, models=("echo", "ghost"))
        try:
            assert not await backend.ready()
            with pytest.raises(BackendUnavailable, match="model ghost is not available") as raised:
                await backend.infer("ghost", image(0))
            assert "unknown model" not in str(raised.value)  # Triton's own text stays in the log
            assert (await backend.infer("echo", image(0)))["SUM"].shape == (1,)
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recovers_when_triton_comes_back_on_the_same_ports(
    tiny_repository: Path, tmp_path: Path, protocol: str
) -> None:
    server = start_on_free_ports(tiny_repository, tmp_path / "first")
    ports = (server.http_port, server.grpc_port, server.metrics_port)

    async def scenario() -> None:
        nonlocal server
        backend = make_backend(tiny_repository, url_for(server, protocol), protocol)
        try:
            assert (await backend.infer("echo", image(1)))["SUM"][0] == float(image(1).sum(dtype=np.int64))
            server.kill()
            assert not await backend.ready()
            with pytest.raises(BackendUnavailable):
                await backend.infer("echo", image(1))
            server = await asyncio.to_thread(start_tritonserver, tiny_repository, *ports, work_dir=tmp_path / "second")
            deadline = time.monotonic() + 10
            while not await backend.ready():
                assert time.monotonic() < deadline, "backend did not notice Triton came back within 10 s"
                await asyncio.sleep(0.1)
            assert (await backend.infer("echo", image(2)))["SUM"][0] == float(image(2).sum(dtype=np.int64))
        finally:
            await backend.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
