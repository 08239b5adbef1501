"""One model owner fed by several HTTP processes' backends (service/backends/owner.py), in one event loop
here: answers reach their callers, images of different clients share the owner's batches, errors and a
vanished owner are `BackendUnavailable`, a caller that gives up cancels its images."""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.backends.base import Backend, BackendUnavailable
from service.backends.batching import BatchedModel
from service.backends.local import LocalBackend
from service.backends.owner import ModelOwner, OwnerBackend
from service.backends.base import Encoded
from service.core.device_decode import DevicePreparer, device_preparers
from service.core.pipeline import TaskPipeline
from service.imaging.images import ImageError
from service.settings import Settings
from service.backends.pipelined import PipelinedBatchedModel
from service.backends.torchscript import TorchScriptModel
from service.timing import BatchTiming
from tests.service.test_pipelined import _images, model, tiny_repository  # noqa: F401 - the tiny classifier


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


def _jpeg(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((width, height)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_jpegs_travel_undecoded_and_the_owner_decodes_them(tiny_repository: Path) -> None:  # noqa: F811
    """With `device_decode` on, the HTTP process sends JPEGs as files; the owner (a real LocalBackend)
    decodes each batch's JPEGs together and answers as for the same images prepared by the device path,
    arrays and JPEGs mixed in one call. A JPEG the owner cannot decode is the client's 4xx error with its
    index, and the owner keeps serving."""
    settings = Settings(
        model_repository=tiny_repository, models=("classifier",), device="cpu", runtime="torchscript",
        device_decode="on", max_batch_size=8,
    )  # fmt: skip
    jpegs = [_jpeg(64, 48, 1), _jpeg(40, 72, 2)]
    array = _images(1, 5)[0]

    async def run() -> None:
        backend = LocalBackend(settings)
        assert not backend.decodes_on_device  # until given the core's preparers, as service.owner_app does
        backend.use_device_decode(device_preparers(settings))
        assert backend.decodes_on_device
        path = _socket()
        server = await ModelOwner(backend).serve(path)
        client = OwnerBackend(path)
        assert not client.decodes_on_device  # until the owner says so
        assert await client.ready() and client.decodes_on_device
        answers = await client.infer_many("classifier", [Encoded(jpegs[0], 1), array, Encoded(jpegs[1], 6)])
        batched = backend._models["classifier"]
        assert batched.preparer is not None and batched.preparer.decoded_on_device == 2

        preparer = DevicePreparer(batched.preparer.pipeline, "cpu")
        first, second = preparer.prepare_each([Encoded(jpegs[0], 1), Encoded(jpegs[1], 6)])
        assert tuple(second.shape) == (3, 16, 16)  # type: ignore[union-attr]
        expected = batched.model.infer([first.numpy(), array, second.numpy()])  # type: ignore[union-attr]
        for answer, want in zip(answers, expected, strict=True):
            np.testing.assert_allclose(answer["PROBS"], want["PROBS"], atol=1e-6)

        with pytest.raises(ImageError) as refused:
            await client.infer_many("classifier", [Encoded(jpegs[0], 1), Encoded(b"\xff\xd8 not a JPEG", 1)])
        assert refused.value.index == 1 and 400 <= refused.value.status_code < 500
        assert "not a JPEG" not in str(refused.value)  # our words, not the bytes or a decoder's
        again = await client.infer("classifier", Encoded(jpegs[1], 1))  # type: ignore[arg-type]
        assert again["PROBS"].shape == (5,)
        assert await client.decoded() == {"classifier": {"device": 4, "cpu": 0}}  # the refused one: neither
        await client.close()
        server.close()
        await backend.close()

    asyncio.run(run())


def test_the_cuda_batcher_decodes_and_refuses_per_image(
    model: TorchScriptModel, tiny_repository: Path  # noqa: F811
) -> None:
    """The pipelined batcher (the CUDA runner's, here on the CPU) takes JPEGs too: one batch, each refused
    image its own error, the others answered."""
    pipeline = TaskPipeline.load(Settings(model_repository=tiny_repository), "classifier")
    batched = PipelinedBatchedModel(model, 8, 0.05, "embedded")
    batched.preparer = DevicePreparer(pipeline, "cpu")
    jpeg = _jpeg(64, 48, 3)
    array = _images(1, 9)[0]

    async def run() -> list[object]:
        batched.announce(3)
        futures = [batched.submit(Encoded(jpeg, 1)), batched.submit(Encoded(b"junk", 1)), batched.submit(array)]
        batched.arrived(3)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        answers = asyncio.run(run())
    finally:
        batched.close()
    assert isinstance(answers[1], ImageError)
    (decoded,) = DevicePreparer(pipeline, "cpu").prepare_each([Encoded(jpeg, 1)])
    expected = model.infer([decoded.numpy(), array])  # type: ignore[union-attr]
    np.testing.assert_allclose(answers[0]["PROBS"], expected[0]["PROBS"], atol=1e-6)  # type: ignore[index]
    np.testing.assert_allclose(answers[2]["PROBS"], expected[1]["PROBS"], atol=1e-6)  # type: ignore[index]
    assert batched.batch_sizes == {2: 1}
