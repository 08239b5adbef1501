"""The client's API key, retries on 503 and timeouts, against the real API served by uvicorn in this process."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from itertools import pairwise

import numpy as np
import pytest

from cvserve.client import AsyncClient, Client, GatewayError, GatewayUnreachable, RetryPolicy
from tests.client.conftest import KEY, Refusals, single_shape
from tests.conftest import free_port


def test_the_api_key_is_sent_from_the_argument_or_the_environment(
    keyed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, label = single_shape(7002)
    monkeypatch.delenv("CVSERVE_API_KEY", raising=False)
    with Client(keyed_url, api_key="wrong-key-wrong-key-wrong") as client:
        with pytest.raises(GatewayError) as refused:
            client.classify(image)
        assert client.health().status == "ok"  # probes stay open
    assert (refused.value.status_code, refused.value.code) == (401, "unauthorized")
    assert "X-API-Key" in refused.value.message
    with Client(keyed_url) as client, pytest.raises(GatewayError, match="401 unauthorized"):
        client.classify(image)  # no key at all
    with Client(keyed_url, api_key=KEY) as client:
        assert client.classify(image, top_k=1).results[0].predictions[0].label == label
    monkeypatch.setenv("CVSERVE_API_KEY", KEY)
    with Client(keyed_url) as client:
        assert client.classify(image, top_k=1).results[0].predictions[0].label == label


def test_503_is_retried_after_its_retry_after(keyed_url: str, refusals: Refusals) -> None:
    image, label = single_shape(7002)
    refusals.arm(count=2, retry_after="1")
    began = time.monotonic()
    with Client(keyed_url, api_key=KEY) as client:
        answer = client.classify(image, top_k=1)
    assert answer.results[0].predictions[0].label == label
    times = [arrived for arrived, _, _ in refusals.seen]
    assert [status for _, _, status in refusals.seen] == [503, 503, 200]
    assert all(later - earlier >= 0.95 for earlier, later in pairwise(times)), times
    assert time.monotonic() - began < 10


def test_retries_stop_at_the_attempt_and_wait_bounds(keyed_url: str, refusals: Refusals) -> None:
    image, _ = single_shape(7002)
    refusals.arm(count=5, retry_after="1")
    with (
        Client(keyed_url, api_key=KEY, retry=RetryPolicy(attempts=2)) as client,
        pytest.raises(GatewayError) as refused,
    ):
        client.classify(image)
    assert (refused.value.status_code, refused.value.code, refused.value.retry_after) == (
        503,
        "overloaded",
        1.0,
    )
    assert len(refusals.seen) == 2
    refusals.arm(count=1, text=True)  # not the gateway's JSON (Serve's queue-full 503 is text)
    with (
        Client(keyed_url, api_key=KEY, retry=RetryPolicy(attempts=1)) as client,
        pytest.raises(GatewayError) as plain,
    ):
        client.classify(image)
    assert (plain.value.status_code, plain.value.code, plain.value.message) == (
        503,
        "http_503",
        "busy; retry later",
    )
    refusals.arm(count=5, retry_after="30")  # longer than the client will wait in all: raised at once
    began = time.monotonic()
    with (
        Client(keyed_url, api_key=KEY, retry=RetryPolicy(max_wait_s=5)) as client,
        pytest.raises(GatewayError),
    ):
        client.classify(image)
    assert time.monotonic() - began < 2 and len(refusals.seen) == 1


def test_retry_after_as_a_date_and_backoff_without_one(keyed_url: str, refusals: Refusals) -> None:
    image, _ = single_shape(7002)
    refusals.arm(count=1, retry_after=formatdate(time.time() + 2, usegmt=True))
    with Client(keyed_url, api_key=KEY) as client:
        client.classify(image)
    (first, _, _), (second, _, _) = refusals.seen
    assert second - first >= 0.9  # HTTP dates have whole seconds: between 1 and 2 s from now
    refusals.arm(count=2)  # no Retry-After: 0.2 s, then 0.4 s
    with Client(keyed_url, api_key=KEY, retry=RetryPolicy(backoff_s=0.2)) as client:
        client.classify(image)
    times = [arrived for arrived, _, _ in refusals.seen]
    assert len(times) == 3 and times[1] - times[0] >= 0.19 and times[2] - times[1] >= 0.39, times


def test_async_client_retries_a_really_overloaded_gateway(keyed_url: str, refusals: Refusals) -> None:
    """The gateway admits one request at a time here: a burst gets real 503s, and every request is answered."""
    rng = np.random.default_rng(0)
    large = rng.integers(0, 256, size=(1200, 1200, 3), dtype=np.uint8)  # slow enough to decode to overlap

    async def burst() -> list[int]:
        async with AsyncClient(
            keyed_url, api_key=KEY, retry=RetryPolicy(attempts=20, max_wait_s=60)
        ) as client:
            answers = await asyncio.gather(*(client.classify(large, top_k=1) for _ in range(6)))
        return [len(a.results) for a in answers]

    assert asyncio.run(burst()) == [1] * 6
    statuses = [status for _, _, status in refusals.seen]
    assert statuses.count(200) == 6 and statuses.count(503) >= 1, statuses


def test_async_503_retry_and_typed_errors(keyed_url: str, refusals: Refusals) -> None:
    image, label = single_shape(7002)

    async def calls() -> tuple[str, GatewayError]:
        async with AsyncClient(keyed_url, api_key=KEY) as client:
            refusals.arm(count=1, retry_after="1")
            answer = await client.classify(image, top_k=1)
            try:
                await client.classify(image, top_k=0)
            except GatewayError as error:
                return answer.results[0].predictions[0].label, error
        raise AssertionError("top_k=0 was accepted")

    said, error = asyncio.run(calls())
    assert said == label and (error.status_code, error.code) == (422, "invalid_request")
    assert [status for _, _, status in refusals.seen][:2] == [503, 200]


def test_timeouts_and_unreachable_gateways_raise_gateway_unreachable(
    keyed_url: str, refusals: Refusals
) -> None:
    image, _ = single_shape(7002)
    refusals.arm(delay_s=2.0)
    with (
        Client(keyed_url, api_key=KEY, timeout=0.3) as client,
        pytest.raises(GatewayUnreachable, match="timed out"),
    ):
        client.classify(image)
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(GatewayUnreachable):
        client.health()
