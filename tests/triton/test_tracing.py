"""One request is one trace through the gateway and a real tritonserver (bundled 2.51, OpenTelemetry mode).

The gateway (in this process, Triton backend) and tritonserver (`trace_url`) export to the same
real OTLP/HTTP receiver; the gateway passes its request's context to Triton as gRPC metadata or
HTTP headers, so Triton's spans (`InferRequest` → model → `compute`) hang under the gateway's.
"""

from __future__ import annotations

import io
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.triton import TritonBackend
from service.settings import Settings
from stack.triton import TritonServer, start_tritonserver
from support.otlp import OtlpReceiver, ReceivedSpan
from support.ports import free_ports
from tests.service.telemetry.test_stage_timings import parse
from tests.triton.conftest import MODEL_LOAD_TIMEOUT_S
from training.shapes import make_scene

GATEWAY = "cvserve-test-gateway"
TRITON = "triton-inference-server"  # tritonserver's default service.name
MODEL = "classifier"
SPAN_KIND_SERVER = 2
CLOCK_TOLERANCE_NS = 1_000_000  # both read the same system clock; allow for rounding


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, 96, 1, 1).image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def traced_triton(
    cpu_repository: Path, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """tritonserver serving the classifier (python backend, CPU), tracing every request to `receiver`."""
    repository = tmp_path_factory.mktemp("traced_repository")
    shutil.copytree(cpu_repository / MODEL, repository / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    server = start_tritonserver(
        repository, *free_ports(3), work_dir=tmp_path_factory.mktemp("traced_triton"),
        ready_timeout_s=MODEL_LOAD_TIMEOUT_S, trace_url=receiver.url,
    )  # fmt: skip
    yield server
    server.stop()


def gateway_answers(settings: Settings, requests: list[tuple[dict[str, str], int]]) -> list[tuple[int, str]]:
    """POST one image per (headers, seed) to one gateway built on `settings`, one after another; each
    answer's status and Server-Timing header."""
    backend = TritonBackend(settings)
    api = create_api(settings, backend)
    answers = []
    try:
        with TestClient(api) as client:
            for headers, seed in requests:
                response = client.post(
                    "/classify", content=png(seed), headers={"Content-Type": "image/png", **headers}
                )
                answers.append((response.status_code, response.headers.get("server-timing", "")))
            client.portal.call(backend.close)  # the gRPC/HTTP client lives on the app's loop
    finally:
        api.state.answerer.close()  # flushes the gateway's spans (tracing on)
    return answers


def triton_settings(
    model_repository: Path, server: TritonServer, receiver: OtlpReceiver, protocol: str, tracing: bool
) -> Settings:
    return Settings(
        backend="triton", triton_protocol=protocol, models=(MODEL,), model_repository=model_repository,
        triton_url=server.grpc_url if protocol == "grpc" else server.http_url,
        tracing=tracing, otlp_endpoint=receiver.url, tracing_service_name=GATEWAY,
    )  # fmt: skip


def by_name(spans: list[ReceivedSpan], service: str) -> dict[str, ReceivedSpan]:
    named = {span.name: span for span in spans if span.service == service}
    assert len(named) == len([span for span in spans if span.service == service]), [s.name for s in spans]
    return named


# tritonserver's gRPC frontend reads `traceparent` past its end and loses a few percent of contexts
# (service.backends.triton.GRPC_TRACE_CONTEXT_WARNING): over gRPC most requests, not all, must join.
# Over HTTP every trace joins. Over gRPC tritonserver drops some requests' context (GRPC_TRACE_CONTEXT_WARNING;
# 2 to 5 of 5 joined in past runs), so it sends more and asks for at least 2: propagation works, not a rate.
N_TRACED = {"http": 5, "grpc": 10}
MIN_JOINED = {"http": N_TRACED["http"], "grpc": 2}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_request_is_one_trace_through_gateway_and_triton(
    model_repository: Path, traced_triton: TritonServer, receiver: OtlpReceiver, protocol: str
) -> None:
    receiver.clear()
    traces = [(secrets.token_hex(16), secrets.token_hex(8)) for _ in range(N_TRACED[protocol])]
    settings = triton_settings(model_repository, traced_triton, receiver, protocol, tracing=True)
    answers = gateway_answers(
        settings,
        [
            ({"traceparent": f"00-{trace_id}-{client_span}-01"}, seed)
            for seed, (trace_id, client_span) in enumerate(traces)
        ],
    )
    assert [status for status, _ in answers] == [200] * N_TRACED[protocol]

    def complete(spans: list[ReceivedSpan]) -> bool:
        # Every request's gateway span and each of Triton's traces (joined or not) is in.
        finished = {s.trace_id for s in spans if s.service == TRITON and s.name == "compute"}
        requests = {s.trace_id for s in spans if s.service == GATEWAY and s.name == "POST /classify"}
        triton_roots = [s for s in spans if s.service == TRITON and s.name == "InferRequest"]
        return (
            requests >= {t for t, _ in traces}
            and len(triton_roots) >= N_TRACED[protocol]
            and all(s.trace_id in finished for s in triton_roots)
        )

    receiver.wait_for_spans(
        complete, timeout_s=30, what=f"gateway and Triton spans of {N_TRACED[protocol]} requests"
    )
    joined = [
        (trace_id, client_span, timing)
        for (trace_id, client_span), (_, timing) in zip(traces, answers, strict=True)
        if any(s.service == TRITON for s in receiver.trace(trace_id))
    ]
    assert len(joined) >= MIN_JOINED[protocol], (
        f"{len(joined)} of {N_TRACED[protocol]} Triton traces joined the gateway's"
    )

    for trace_id, client_span_id, timing in joined:
        durations_ms, _ = parse(timing)
        trace = receiver.trace(trace_id)
        gateway, triton = by_name(trace, GATEWAY), by_name(trace, TRITON)
        assert {s.service for s in trace} == {GATEWAY, TRITON}
        assert set(triton) == {"InferRequest", MODEL, "compute"}
        assert set(gateway) == {"POST /classify", *durations_ms} - {"total"}  # a span per Server-Timing stage
        assert durations_ms["queue"] == 0  # the Triton backend counts Triton's queue in `model`
        request = gateway["POST /classify"]
        assert request.kind == SPAN_KIND_SERVER and request.parent_span_id == client_span_id
        assert request.attributes["cvserve.backend"] == "triton"

        # Triton's request hangs under the gateway's request span, and its model and compute under that.
        infer = triton["InferRequest"]
        assert infer.parent_span_id == request.span_id
        assert triton[MODEL].parent_span_id == infer.span_id
        assert triton[MODEL].attributes["triton.model_name"] == MODEL
        assert triton["compute"].parent_span_id == triton[MODEL].span_id
        # What causality guarantees: Triton received the call after the gateway's request began and
        # began computing before the gateway had the answer, within the gateway's model stage. Triton's
        # span ends are no such bound: it ends `compute` and `InferRequest` after the response has left
        # (the python backend answers before `execute` returns), sometimes after the gateway has ended
        # its own span.
        compute, model = triton["compute"], gateway["model"]
        assert request.start_ns - CLOCK_TOLERANCE_NS <= infer.start_ns <= compute.start_ns
        assert compute.start_ns <= request.end_ns + CLOCK_TOLERANCE_NS
        assert compute.start_ns - infer.start_ns <= model.end_ns - model.start_ns + CLOCK_TOLERANCE_NS


def test_tracing_over_grpc_warns_that_triton_drops_some_contexts(
    model_repository: Path,
    traced_triton: TritonServer,
    receiver: OtlpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.backends.triton import GRPC_TRACE_CONTEXT_WARNING

    for protocol in ("http", "grpc"):
        caplog.clear()
        TritonBackend(triton_settings(model_repository, traced_triton, receiver, protocol, tracing=True))
        warned = GRPC_TRACE_CONTEXT_WARNING in [record.getMessage() for record in caplog.records]
        assert warned == (protocol == "grpc"), protocol


def test_with_tracing_off_the_gateway_passes_no_context_to_triton(
    model_repository: Path, traced_triton: TritonServer, receiver: OtlpReceiver
) -> None:
    trace_id = secrets.token_hex(16)
    receiver.clear()
    settings = triton_settings(model_repository, traced_triton, receiver, "grpc", tracing=False)
    ((status, timing),) = gateway_answers(
        settings, [({"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}, 2)]
    )
    assert status == 200 and timing

    # Triton traces one request in `rate` (1) on its own: it starts a trace of its own, and the
    # gateway sent neither spans nor the client's context (late Triton spans of earlier tests have parents).
    spans = receiver.wait_for_spans(
        lambda spans: any(s.name == "InferRequest" and not s.parent_span_id for s in spans),
        timeout_s=20,
        what="Triton's own root trace",
    )
    assert trace_id not in {s.trace_id for s in spans}
    assert {s.service for s in spans} == {TRITON}
