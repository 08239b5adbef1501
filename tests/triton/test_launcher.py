"""The tritonserver launcher: readiness, restricted management APIs, metrics, clean shutdown."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from stack.triton import TritonServer, start_tritonserver
from support.ports import free_ports
from tests.triton.conftest import start_on_free_ports


def test_server_is_ready_and_serves_the_repository(tiny_triton: TritonServer) -> None:
    with triton_http.InferenceServerClient(tiny_triton.http_url) as client:
        assert client.is_server_ready()
        assert client.is_model_ready("echo") and client.is_model_ready("slow")
        image = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(1, 3, 8, 8)
        infer_input = triton_http.InferInput("IMAGE", [1, 3, 8, 8], "UINT8")
        infer_input.set_data_from_numpy(image)
        result = client.infer("echo", [infer_input])
        assert result.as_numpy("SUM")[0, 0] == float(image.sum())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_repository_api_needs_the_admin_header(tiny_triton: TritonServer, protocol: str) -> None:
    if protocol == "http":
        client = triton_http.InferenceServerClient(tiny_triton.http_url)
    else:
        client = triton_grpc.InferenceServerClient(tiny_triton.grpc_url)
    with client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("echo")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        index = client.get_model_repository_index(headers=tiny_triton.admin_headers(protocol))
        names = [m["name"] for m in index] if protocol == "http" else [m.name for m in index.models]
        assert sorted(names) == ["echo", "slow"]
        # Inference stays open, and model control stays off even with the header (mode none).
        assert client.is_model_ready("echo")
        with pytest.raises(InferenceServerException):
            client.load_model("echo", headers=tiny_triton.admin_headers(protocol))


def test_metrics_endpoint_is_on(tiny_triton: TritonServer) -> None:
    import httpx

    text = httpx.get(tiny_triton.metrics_url, timeout=5).text
    assert 'nv_inference_count{model="echo",version="1"}' in text


def test_stop_ends_the_server_and_its_stub_processes(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_on_free_ports(tiny_repository, tmp_path)
    group = os.getpgid(server.process.pid)
    assert group == server.process.pid, "tritonserver must lead its own process group"
    server.stop()
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing left in the group: python-backend stubs are gone too
    assert not server.is_ready()


def test_start_fails_clearly_on_a_broken_repository(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\n')
    (repository / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('broken on purpose')\n"
    )
    with pytest.raises(RuntimeError, match="tritonserver exited"):
        start_tritonserver(repository, *free_ports(3), work_dir=tmp_path / "work")


def test_start_refuses_a_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the export first"):
        start_tritonserver(tmp_path / "nope", *free_ports(3), work_dir=tmp_path)
