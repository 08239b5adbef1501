"""The CPU repository really serves: a tritonserver (python backend) answers like the eager models.

Concurrent requests are merged by Triton's dynamic batcher (the export's queue delay is long
here), so model.py has to split one batch's outputs back to the right requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http

from service.contract import load_contract
from stack.triton import TritonServer, start_tritonserver
from support.ports import free_ports
from support.triton_metrics import triton_metric
from support.waiting import wait_for
from tasks import MODELS
from tests.export.conftest import Exported
from tests.export.support import assert_classifier_matches, assert_detector_matches, assert_segmenter_matches
from training.shapes import make_scene

ASSERT_MATCHES = {
    "classifier": assert_classifier_matches,
    "detector": assert_detector_matches,
    "segmenter": assert_segmenter_matches,
}

COUNTERS = ("nv_inference_count", "nv_inference_exec_count")


@pytest.fixture(scope="module")
def cpu_server(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_tritonserver(
        exported.cpu_out,
        *free_ports(3),
        work_dir=tmp_path_factory.mktemp("export_triton"),
        ready_timeout_s=300,
    )
    yield server
    server.stop()


def infer(server: TritonServer, model: str, images: np.ndarray) -> list[torch.Tensor]:
    """One request; outputs in the contract's order."""
    names = [t.name for t in load_contract(server.repository, model).outputs]
    with triton_http.InferenceServerClient(server.http_url, network_timeout=120) as client:
        tensor = triton_http.InferInput("IMAGE", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(model, [tensor])
    return [torch.from_numpy(result.as_numpy(name).copy()) for name in names]


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_answer_like_the_eager_model(
    cpu_server: TritonServer, exported: Exported, model: str, tmp_path: Path
) -> None:
    size = load_contract(exported.cpu_out, model).input_size[0]
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    scene = make_scene(100, size).image.transpose(2, 0, 1)
    requests = [noise[:1], np.stack([scene, noise[1]]), noise[2:]]  # three requests, four images
    before = {name: triton_metric(cpu_server.metrics_url, name, model, default=0.0) for name in COUNTERS}
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda images: infer(cpu_server, model, images), requests))
    images_in = sum(len(images) for images in requests)

    def counted(name: str) -> float:
        return triton_metric(cpu_server.metrics_url, name, model, default=0.0) - before[name]

    # Triton's metrics endpoint may trail the responses a little
    wait_for(
        lambda: counted("nv_inference_count") >= images_in, 10, "Triton's metrics never counted the requests"
    )
    executions = counted("nv_inference_exec_count")
    assert executions < len(requests), "Triton ran every request alone: nothing was batched"
    for images, outputs in zip(requests, answers, strict=True):
        ASSERT_MATCHES[model](exported.checkpoints[model].model, torch.from_numpy(images), outputs)
