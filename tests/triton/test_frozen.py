"""A frozen tritonserver (SIGSTOP: the process lives, its sockets accept, nothing answers) costs
the gateway about two seconds, not the request deadline: calls in flight and new ones get 503
(BackendUnavailable) quickly, /ready turns false, and the backend recovers when Triton thaws."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from service.backends.base import BackendUnavailable
from tests.triton.conftest import start_on_free_ports
from tests.triton.test_backend import PROTOCOLS, image, make_backend, url_for

DEADLINE_S = 30.0  # the request deadline: far longer than the gateway may take to give up on a frozen Triton
FROZEN_503_WITHIN_S = 2.5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frozen_triton_gives_503_within_two_seconds_and_recovers(
    tiny_repository: Path, tmp_path: Path, protocol: str
) -> None:
    server = start_on_free_ports(tiny_repository, tmp_path / "triton")  # its own: this test freezes it
    group = server.process.pid

    async def scenario() -> None:
        backend = make_backend(tiny_repository, url_for(server, protocol), protocol, timeout_s=DEADLINE_S)
        try:
            assert (await backend.infer("echo", image(0)))["SUM"][0] == float(image(0).sum())
            in_flight = asyncio.ensure_future(backend.infer("slow", image(1)))  # Triton works on it for 1 s
            await asyncio.sleep(0.2)
            os.killpg(group, signal.SIGSTOP)
            frozen_at = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await in_flight
            in_flight_s = time.monotonic() - frozen_at
            with pytest.raises(BackendUnavailable):
                await backend.infer("echo", image(2))
            new_call_s = time.monotonic() - frozen_at - in_flight_s
            assert in_flight_s < FROZEN_503_WITHIN_S, f"the call in flight took {in_flight_s:.1f} s to fail"
            assert new_call_s < FROZEN_503_WITHIN_S, f"a new call took {new_call_s:.1f} s to fail"
            assert not await backend.ready()

            os.killpg(group, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while True:
                try:
                    outputs = await backend.infer("echo", image(3))
                    break
                except BackendUnavailable:
                    assert time.monotonic() < deadline, "the backend never recovered after Triton thawed"
                    await asyncio.sleep(0.2)
            assert outputs["SUM"][0] == float(image(3).sum())
            assert await backend.ready()
        finally:
            await backend.close()

    try:
        asyncio.run(scenario())
    finally:
        os.killpg(group, signal.SIGCONT)
        server.stop()
