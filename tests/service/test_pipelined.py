"""The CUDA runner (service/backends/pipelined.py), run here on the CPU: padded to buckets it answers as the
plain runner does, and its batcher keeps two batches in flight with every answer reaching its caller."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.repository import Batching, model_config
from export.spec import ModelSpec
from export.wrappers import ClassifierWrapper, save, script
from service.backends.batching import BatchedModel
from service.backends.pipelined import (
    PipelinedBatchedModel, PipelinedRunner, batched_model, time_kernels_per_shape,
)  # fmt: skip
from service.backends.torchscript import TorchScriptModel
from service.model_config import dump


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with a tiny classifier exported like the real ones (uint8 [B,3,16,16] in, PROBS out)."""
    root = tmp_path_factory.mktemp("repository")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    wrapper = ClassifierWrapper(net, [0.5] * 3, [0.25] * 3).eval()
    spec = ModelSpec("classifier", wrapper, tuple("abcde"), 16, "checkpoint:x", 16)
    (root / "classifier" / "1").mkdir(parents=True)
    (root / "classifier" / "config.pbtxt").write_text(
        dump(model_config(spec, Batching(16, (4, 8, 16)), cpu=False))
    )
    (root / "classifier" / "labels.txt").write_text("\n".join(spec.labels) + "\n")
    save(script(wrapper), str(root / "classifier" / "1" / "model.pt"))
    return root


@pytest.fixture(scope="module")
def model(tiny_repository: Path) -> TorchScriptModel:
    """The tiny classifier, loaded on the CPU."""
    return TorchScriptModel(tiny_repository, "classifier", "cpu")


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (count, 3, 16, 16), dtype=np.uint8))


def test_padded_batches_answer_as_the_plain_runner(model: TorchScriptModel) -> None:
    runner = PipelinedRunner(model, (1, 4, 8, 16))
    for count in (1, 3, 4, 5, 13, 16):
        images = _images(count, count)
        got, want = runner.infer(images), model.infer(images)
        assert len(got) == count
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g["PROBS"], w["PROBS"], atol=1e-6)
    assert runner.shapes_run == {1, 4, 8, 16}
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        runner.launch(_images(17))


def test_a_device_tensor_batch_is_taken_as_is(model: TorchScriptModel) -> None:
    runner = PipelinedRunner(model, (1, 4))
    images = _images(3)
    got = runner.finish(runner.launch(torch.from_numpy(np.stack(images))))
    np.testing.assert_allclose(got[2]["PROBS"], model.infer(images)[2]["PROBS"], atol=1e-6)


def test_the_batcher_keeps_two_batches_in_flight(model: TorchScriptModel) -> None:
    batched = PipelinedBatchedModel(model, 4, 0.0, "embedded")
    finish = batched.runner.finish
    finishing = threading.Semaphore(0)

    def slow_finish(launched):  # noqa: ANN001, ANN202 - the device still computing
        finishing.release()
        time.sleep(0.2)
        return finish(launched)

    batched.runner.finish = slow_finish  # type: ignore[method-assign]
    images = _images(12, 7)

    async def run() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*(batched.infer(image) for image in images)))

    try:
        answers = asyncio.run(run())
    finally:
        batched.close()
    for answer, expected in zip(answers, model.infer(images), strict=True):
        np.testing.assert_allclose(answer["PROBS"], expected["PROBS"], atol=1e-6)
    assert batched.most_in_flight == 2
    assert sum(size * n for size, n in batched.batch_sizes.items()) == 12


def test_cpu_models_keep_the_plain_batcher(model: TorchScriptModel) -> None:
    assert type(batched_model(model, 4, 0.0, "embedded")) is BatchedModel


def test_cudnn_times_kernels_per_shape_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner pads every batch to a bucket: on CUDA it has cuDNN keep the fastest kernels per shape, as
    the GPU check's model sweep does; a CPU runner leaves the setting as it was."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    time_kernels_per_shape(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    time_kernels_per_shape(torch.device("cuda", 0))  # no CUDA needed: it is a flag for later convolutions
    assert torch.backends.cudnn.benchmark is True
