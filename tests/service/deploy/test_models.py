"""EmbeddedBackend turns handle failures into BackendUnavailable (503) / BackendTimeout (504).

These use stand-in handles: provoking back-pressure or a hung replica for real would need
dedicated deployments; test_errors covers how the gateway answers them over HTTP.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from service.backends.base import BackendTimeout, BackendUnavailable
from service.deploy.models import EmbeddedBackend

IMAGE = np.zeros((3, 4, 4), dtype=np.uint8)


class FakeResponse:
    """Awaitable like a DeploymentResponse: resolves to `result`, raises `error`, or never finishes."""

    def __init__(self, result: Any = None, error: Exception | None = None, hang: bool = False) -> None:
        self.result, self.error, self.hang, self.cancelled = result, error, hang, False

    def __await__(self):  # noqa: ANN204
        return self._wait().__await__()

    async def _wait(self) -> Any:
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response

    def remote(self, *args: Any) -> FakeResponse:
        return self.response


class FakeHandle:
    def __init__(self, infer: FakeResponse, ready: FakeResponse | None = None) -> None:
        self.infer_many = FakeMethod(infer)
        self.ready = FakeMethod(ready or FakeResponse(True))


def test_outputs_are_passed_through() -> None:
    backend = EmbeddedBackend({"m": FakeHandle(FakeResponse([{"PROBS": np.ones(3)}]))}, request_timeout_s=1)
    outputs = asyncio.run(backend.infer("m", IMAGE))
    np.testing.assert_array_equal(outputs["PROBS"], np.ones(3))
    assert asyncio.run(backend.ready()) is True


def test_a_slow_model_times_out_and_the_call_is_cancelled() -> None:
    response = FakeResponse(hang=True)
    backend = EmbeddedBackend({"m": FakeHandle(response)}, request_timeout_s=0.05)
    with pytest.raises(BackendTimeout, match="did not answer within"):
        asyncio.run(backend.infer("m", IMAGE))
    assert response.cancelled


def test_back_pressure_is_unavailable_without_ray_text() -> None:
    error = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    backend = EmbeddedBackend({"m": FakeHandle(FakeResponse(error=error))}, request_timeout_s=1)
    with pytest.raises(BackendUnavailable) as raised:
        asyncio.run(backend.infer("m", IMAGE))
    assert "queue" not in str(raised.value).lower() and "retry" in str(raised.value)


def test_ready_is_false_when_a_model_fails_or_hangs() -> None:
    failing = FakeHandle(FakeResponse(), ready=FakeResponse(error=RuntimeError("replica died")))
    assert asyncio.run(EmbeddedBackend({"m": failing}, request_timeout_s=1).ready()) is False
