"""`python -m stack` end to end: Triton on CPU, the gateway in Triton mode and Prometheus come up
from the repository's own config, count real traffic, trace it (`--trace-url`, to a real OTLP/HTTP
receiver) through the real gateway (HAProxy, Ray Serve) into Triton, and all stop on Ctrl-C."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stack import __main__ as stack_main
from stack.prometheus import PrometheusAPI
from support.otlp import OtlpReceiver
from support.ports import reserved_free_ports
from support.triton_metrics import triton_metric
from support.waiting import wait_for
from tests.conftest import ROOT
from tests.ops.conftest import png_image, scalar
from tests.security.listeners import listeners, rejects_unauthenticated_grpc

N_REQUESTS = 5


@dataclass
class RunningStack:
    process: subprocess.Popen[bytes]
    ports: stack_main.Ports
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> Iterator[RunningStack]:
    """`python -m stack` on free ports; CVSERVE_TEST_CPU_REPOSITORY overrides build/triton_cpu_repository."""
    cpu_repository = Path(
        os.environ.get("CVSERVE_TEST_CPU_REPOSITORY", ROOT / "build" / "triton_cpu_repository")
    )
    if not any(cpu_repository.glob("*/config.pbtxt")):
        pytest.fail(f"{cpu_repository} has no models: run `make models` first")
    # Every port free and from the reserved range: the stack binds them over a minute while Ray, Triton
    # and their clients open sockets, and an ephemeral port picked now may be some client's by then
    # (tritonserver once found its HTTP port taken).
    names = list(vars(stack_main.Ports()))
    ports = stack_main.Ports(**dict(zip(names, reserved_free_ports(len(names)), strict=True)))
    logs = tmp_path_factory.mktemp("stack")
    args = [f"--{name.replace('_', '-')}-port={port}" for name, port in vars(ports).items()]
    log_path = logs / "stack.out"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stack",
                *args,
                f"--repository={cpu_repository}",
                f"--model-repository={model_repository}",
                f"--logs={logs}",
                f"--trace-url={receiver.url}",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = RunningStack(process, ports, log_path)
    try:
        wait_for(
            lambda: "stack is ready" in running.output() or process.poll() is not None,
            600,
            lambda: f"stack never became ready:\n{running.output()}",
            interval_s=1.0,
        )
        assert process.poll() is None, f"stack exited with {process.returncode}:\n{running.output()}"
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()


def test_stack_serves_requests_and_prometheus_counts_them(stack: RunningStack) -> None:
    gateway = f"http://127.0.0.1:{stack.ports.gateway}"
    prometheus = PrometheusAPI(stack.ports.prometheus)
    # Triton counts its model_warmup runs (each batch size, at load) too: the traffic is what comes on top.
    warmed_up = triton_metric(
        f"http://127.0.0.1:{stack.ports.triton_metrics}/metrics",
        "nv_inference_count",
        "classifier",
        default=0.0,
    )
    image = png_image()
    for _ in range(N_REQUESTS):
        response = httpx.post(
            f"{gateway}/classify", content=image, headers={"content-type": "image/png"}, timeout=120
        )
        assert response.status_code == 200, response.text
    assert response.json()["backend"] == "triton"

    requests = 'sum(ray_cvserve_requests_total{endpoint="/classify", status="200"})'
    inferences = 'sum(nv_inference_count{model="classifier"})'
    wait_for(
        lambda: scalar(prometheus, requests) == N_REQUESTS,
        90,
        lambda: f"{requests} = {scalar(prometheus, requests)}, expected {N_REQUESTS}",
    )
    wait_for(
        lambda: scalar(prometheus, inferences) == warmed_up + N_REQUESTS,
        60,
        lambda: f"{inferences} = {scalar(prometheus, inferences)}, expected {warmed_up:g} + {N_REQUESTS}",
    )
    assert {t["scrapePool"]: t["health"] for t in prometheus.targets()} == {
        "gateway": "up",
        "triton": "up",
        "prometheus": "up",
    }


def test_a_request_is_one_trace_through_the_gateway_and_triton(
    stack: RunningStack, receiver: OtlpReceiver
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(
        f"http://127.0.0.1:{stack.ports.gateway}/detect",
        content=png_image(),
        headers={"content-type": "image/png", "traceparent": f"00-{trace_id}-{client_span}-01"},
        timeout=120,
    )
    assert response.status_code == 200, response.text

    def both(spans: list) -> bool:
        names = {(span.service, span.name) for span in spans if span.trace_id == trace_id}
        return {("cvserve-gateway", "POST /detect"), ("triton-inference-server", "InferRequest")} <= names

    receiver.wait_for_spans(both, timeout_s=30, what=f"the gateway's and Triton's spans of trace {trace_id}")
    spans = {(span.service, span.name): span for span in receiver.trace(trace_id)}
    request = spans[("cvserve-gateway", "POST /detect")]
    assert request.parent_span_id == client_span and request.attributes["cvserve.backend"] == "triton"
    assert spans[("triton-inference-server", "InferRequest")].parent_span_id == request.span_id
    assert ("cvserve-gateway", "model") in spans and spans[
        ("cvserve-gateway", "model")
    ].parent_span_id == request.span_id


def test_the_stack_listens_on_loopback_only(stack: RunningStack) -> None:
    """Triton, Prometheus, the gateway and its Ray: every socket on loopback, or behind Ray's token."""
    found = listeners(stack.process.pid)
    assert set(vars(stack.ports).values()) <= {listener.port for listener in found}
    unprotected = [
        listener
        for listener in found
        if not listener.on_loopback and not rejects_unauthenticated_grpc(listener)
    ]
    assert not unprotected, "\n".join(map(str, unprotected))


def test_ctrl_c_stops_every_service(stack: RunningStack) -> None:
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(90) == 0, stack.output()
    for name, port in vars(stack.ports).items():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} still listens on {port} after Ctrl-C"
