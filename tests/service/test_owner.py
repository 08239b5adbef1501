"""One model owner fed by several HTTP processes' backends (service/backends/owner.py), in one event loop
here: answers reach their callers, images of different clients share the owner's batches, errors and a
vanished owner are `BackendUnavailable`, a caller that gives up cancels its images."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.backends.base import Backend, BackendUnavailable
from service.backends.batching import BatchedModel
from service.backends.owner import ModelOwner, OwnerBackend
from service.backends.torchscript import TorchScriptModel
from service.timing import BatchTiming
from tests.service.test_pipelined import _images, model  # noqa: F401 - the tiny exported classifier fixture


class BatchedBackend(Backend):
    """The owner's side as LocalBackend has it: one BatchedModel per model."""

    def __init__(self, batched: BatchedModel) -> None:
        self.batched = batched
        self.gate = asyncio.Event()
        self.gate.set()

    async def infer(self, name: str, image: np.ndarray) -> dict[str, np.ndarray]:
        return (await self.infer_many(name, [image]))[0]

    async def infer_many(
        self, name: str, images: Sequence[np.ndarray], timings: Sequence[BatchTiming] | None = None
    ) -> list[dict[str, np.ndarray]]:
        if name != "classifier":
            raise KeyError(name)
        await self.gate.wait()
        futures = [
            self.batched.submit(image, t)
            for image, t in zip(images, timings or [None] * len(images), strict=True)
        ]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()

    async def ready(self) -> bool:
        return True


def _socket() -> Path:
    return Path(tempfile.mkdtemp(prefix="owner-", dir="/tmp")) / "s"  # short: Unix socket paths are limited


def test_clients_share_the_owner_s_batches(model: TorchScriptModel) -> None:  # noqa: F811
    async def run() -> None:
        batched = BatchedModel(model, 8, 0.05, "embedded")
        backend = BatchedBackend(batched)
        path = _socket()
        server = await ModelOwner(backend).serve(path)
        clients = [OwnerBackend(path) for _ in range(3)]
        images = _images(12, 3)
        backend.gate.clear()  # hold the owner until every request is in: they must meet in batches
        calls = [
            clients[i % 3].infer_many("classifier", images[i : i + 2], [BatchTiming(), BatchTiming()])
            for i in range(0, 12, 2)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.2)
        backend.gate.set()
        answers = [out for outputs in await asyncio.gather(*tasks) for out in outputs]
        for answer, expected in zip(answers, model.infer(images), strict=True):
            np.testing.assert_allclose(answer["PROBS"], expected["PROBS"], atol=1e-6)
            assert answer["PROBS"].dtype == np.float32
        assert max(batched.batch_sizes) > 2  # images from different clients in one batch
        assert await clients[0].ready()
        with pytest.raises(BackendUnavailable, match="no model"):
            await clients[1].infer("detector", images[0])
        for client in clients:
            await client.close()
        server.close()
        batched.close()

    asyncio.run(run())


def test_a_caller_that_gives_up_cancels_its_images(model: TorchScriptModel) -> None:  # noqa: F811
    async def run() -> None:
        batched = BatchedModel(model, 8, 0.0, "embedded")
        backend = BatchedBackend(batched)
        path = _socket()
        server = await ModelOwner(backend).serve(path)
        client = OwnerBackend(path)
        assert await client.ready()
        backend.gate.clear()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.infer("classifier", _images(1)[0]), 0.2)
        await asyncio.sleep(0.1)
        backend.gate.set()
        await asyncio.sleep(0.1)
        assert sum(batched.batch_sizes.values()) == 0  # never batched
        assert (await client.infer("classifier", _images(1)[0]))["PROBS"].shape == (5,)
        await client.close()
        server.close()
        batched.close()

    asyncio.run(run())


def test_no_owner_is_unavailable_and_a_new_one_is_found(model: TorchScriptModel) -> None:  # noqa: F811
    async def run() -> None:
        path = _socket()
        client = OwnerBackend(path)
        assert not await client.ready()
        with pytest.raises(BackendUnavailable):
            await client.infer("classifier", _images(1)[0])
        batched = BatchedModel(model, 8, 0.0, "embedded")
        server = await ModelOwner(BatchedBackend(batched)).serve(path)
        assert (await client.infer("classifier", _images(1)[0]))["PROBS"].shape == (5,)
        server.close()
        await server.wait_closed()
        batched.close()
        await client.close()

    asyncio.run(run())
