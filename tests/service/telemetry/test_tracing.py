"""OpenTelemetry traces of the in-process gateway, exported to a real OTLP/HTTP receiver.

One request is one trace under the client's `traceparent`: a server span with a child per stage,
each as long as the `Server-Timing` header of the same response says. Bad headers start a new
trace and never fail the request; with tracing off nothing is set up and nothing is sent.
"""

from __future__ import annotations

import base64
import io
import itertools
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from service.timing import STAGES
from service.telemetry.tracing import Tracing
from support.otlp import OtlpReceiver, ReceivedSpan
from tests.service.telemetry.test_stage_timings import parse
from training.shapes import make_scene

SERVICE = "cvserve-test-gateway"
SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
# Server-Timing has two decimals of a millisecond; the span is the same float in whole nanoseconds.
TOLERANCE_MS = 0.006


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, 160, 1, 3).image).save(buffer, "PNG")
    return buffer.getvalue()


def traceparent() -> tuple[str, str, str]:
    """A fresh sampled W3C traceparent, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@dataclass
class Traced:
    client: TestClient
    tracing: Tracing
    receiver: OtlpReceiver

    def spans_of_next_request(
        self, *args: Any, forget_earlier: bool = True, **kwargs: Any
    ) -> tuple[httpx.Response, list[ReceivedSpan]]:
        """POST and the spans received once it is exported (those received earlier are forgotten first)."""
        if forget_earlier:
            self.tracing.force_flush()
            self.receiver.clear()
        response = self.client.post(*args, **kwargs)
        assert self.tracing.force_flush()
        spans = self.receiver.wait_for_spans(
            lambda spans: any(s.kind == SPAN_KIND_SERVER for s in spans), what="the request's server span"
        )
        return response, spans


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def app_settings(model_repository: Path, receiver: OtlpReceiver, **overrides: object) -> Settings:
    return Settings(
        model_repository=model_repository, models=("detector",), device="cpu", warm_up_batch_sizes=False,
        otlp_endpoint=receiver.url, tracing_service_name=SERVICE, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def traced(model_repository: Path, receiver: OtlpReceiver) -> Iterator[Traced]:
    settings = app_settings(model_repository, receiver, tracing=True)
    api = create_api(settings, LocalBackend(settings))
    with TestClient(api) as client:
        yield Traced(client, api.state.tracing, receiver)
    api.state.answerer.close()  # flushes and stops the exporter


def server_span(spans: list[ReceivedSpan]) -> ReceivedSpan:
    (span,) = [s for s in spans if s.kind == SPAN_KIND_SERVER]
    return span


def stage_spans(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    children = [s for s in spans if s.parent_span_id == parent.span_id]
    by_name = {s.name: s for s in children}
    assert len(by_name) == len(children), [s.name for s in children]
    return by_name


def test_a_request_is_one_trace_under_the_clients_span(traced: Traced) -> None:
    header, trace_id, client_span_id = traceparent()
    response, spans = traced.spans_of_next_request(
        "/detect", content=png(1), headers={"Content-Type": "image/png", "traceparent": header}
    )
    assert response.status_code == 200
    assert {s.trace_id for s in spans} == {trace_id}, "the client's trace id is kept for every span"
    request = server_span(spans)
    assert request.name == "POST /detect"
    assert request.parent_span_id == client_span_id
    assert request.service == SERVICE
    assert {
        "http.request.method": "POST", "http.route": "/detect", "http.response.status_code": 200,
        "cvserve.endpoint": "/detect", "cvserve.model": "detector", "cvserve.backend": "embedded",
        "cvserve.images": 1, "cvserve.batch_size": 1,
    }.items() <= request.attributes.items()  # fmt: skip

    stages = stage_spans(spans, request)
    assert set(stages) == set(STAGES)
    assert len(spans) == 1 + len(STAGES), [s.name for s in spans]
    durations_ms, batch = parse(response.headers["Server-Timing"])
    for name, span in stages.items():
        assert span.duration_s * 1000 == pytest.approx(durations_ms[name], abs=TOLERANCE_MS), name
        assert request.start_ns <= span.start_ns <= span.end_ns <= request.end_ns, (
            f"{name} outside the request"
        )
    assert stages["model"].attributes["cvserve.batch_size"] == batch == 1
    assert request.duration_s * 1000 >= durations_ms["total"] - TOLERANCE_MS
    ordered = [stages[name] for name in STAGES]  # one image: the stages follow each other
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(ordered))


def test_images_of_one_request_are_counted_on_its_span(traced: Traced) -> None:
    header, trace_id, _ = traceparent()
    files = [("files", (f"{i}.png", png(10 + i), "image/png")) for i in range(3)]
    response, spans = traced.spans_of_next_request("/detect", files=files, headers={"traceparent": header})
    assert response.status_code == 200
    request = server_span(spans)
    assert request.trace_id == trace_id
    assert request.attributes["cvserve.images"] == 3 and request.attributes["cvserve.batch_size"] == 3
    durations_ms, _ = parse(response.headers["Server-Timing"])
    for name, span in stage_spans(spans, request).items():  # decode and preprocess: summed over the images
        assert span.duration_s * 1000 == pytest.approx(durations_ms[name], abs=TOLERANCE_MS), name


@pytest.mark.parametrize(
    "header",
    [
        b"garbage",
        b"",
        b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01",  # an all-zero trace id is invalid
        b"00-" + b"1" * 32 + b"-" + b"0" * 16 + b"-01",  # so is an all-zero span id
        b"ff-" + b"1" * 32 + b"-" + b"1" * 16 + b"-01",  # version ff is forbidden
        b"00-" + b"g" * 32 + b"-" + b"1" * 16 + b"-01",  # not hex
        b"00-" + b"1" * 31 + b"-" + b"1" * 16 + b"-01",  # too short
        b"00-" + b"a" * 4000,
        b"\xff\xfe\x00traceparent",  # not even text
    ],
    ids=["garbage", "empty", "zero-trace", "zero-span", "version-ff", "not-hex", "short", "long", "binary"],
)
def test_a_bad_traceparent_starts_a_new_trace(traced: Traced, header: bytes) -> None:
    response, spans = traced.spans_of_next_request(
        "/detect", content=png(2), headers={b"Content-Type": b"image/png", b"traceparent": header}
    )
    assert response.status_code == 200, response.text
    request = server_span(spans)
    assert request.parent_span_id == "", "a bad traceparent must not become a parent"
    assert len(request.trace_id) == 32 and request.trace_id.encode() not in header
    assert set(stage_spans(spans, request)) == set(STAGES)


def test_a_failed_request_is_traced_with_its_status(traced: Traced) -> None:
    header, trace_id, client_span_id = traceparent()
    response, spans = traced.spans_of_next_request(
        "/detect", content=b"not an image", headers={"Content-Type": "image/png", "traceparent": header}
    )
    assert response.status_code == 400
    request = server_span(spans)
    assert (request.trace_id, request.parent_span_id) == (trace_id, client_span_id)
    assert request.attributes["http.response.status_code"] == 400


def test_probes_make_no_traces(traced: Traced) -> None:
    traced.tracing.force_flush()
    traced.receiver.clear()
    for path in ("/health", "/ready"):
        assert traced.client.get(path, headers={"traceparent": traceparent()[0]}).status_code == 200
    _, spans = traced.spans_of_next_request(
        "/detect", content=png(6), headers={"Content-Type": "image/png"}, forget_earlier=False
    )
    assert [s.name for s in spans if s.kind == SPAN_KIND_SERVER] == ["POST /detect"]


def test_tracing_without_stage_timings_still_has_stage_spans(
    model_repository: Path, receiver: OtlpReceiver
) -> None:
    settings = app_settings(model_repository, receiver, tracing=True, stage_timings=False)
    api = create_api(settings, LocalBackend(settings))
    try:
        with TestClient(api) as client:
            traced = Traced(client, api.state.tracing, receiver)
            response, spans = traced.spans_of_next_request(
                "/detect", content=png(3), headers={"Content-Type": "image/png"}
            )
    finally:
        api.state.answerer.close()
    assert response.status_code == 200 and "server-timing" not in response.headers
    assert set(stage_spans(spans, server_span(spans))) == set(STAGES)


def _exporter_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("OtelBatch")}


def test_tracing_off_sets_nothing_up_and_sends_nothing(
    model_repository: Path, receiver: OtlpReceiver, traced: Traced
) -> None:
    traced.tracing.force_flush()
    receiver.clear()
    exporters_before = _exporter_threads()
    settings = app_settings(model_repository, receiver)  # tracing off is the default
    assert settings.tracing is False
    api = create_api(settings, LocalBackend(settings))
    assert api.state.tracing is None and api.state.answerer.tracing is None
    assert _exporter_threads() == exporters_before, "tracing off must not start an exporter"
    valid, untraced_id, _ = traceparent()
    try:
        with TestClient(api) as client:
            for header in (valid, "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-00"):
                response = client.post(
                    "/detect", content=png(4), headers={"Content-Type": "image/png", "traceparent": header}
                )
                assert response.status_code == 200 and "server-timing" in response.headers
                assert "traceparent" not in response.headers
    finally:
        api.state.answerer.close()
    # The receiver is listening: a traced request sent after these arrives, and nothing else did.
    _, spans = traced.spans_of_next_request(
        "/detect", content=png(5), headers={"Content-Type": "image/png"}, forget_earlier=False
    )
    assert len({s.trace_id for s in spans}) == 1, "only the traced request's trace arrived"
    assert untraced_id not in {s.trace_id for s in spans}
    assert len(spans) == 1 + len(STAGES) and receiver.rejected == []


def test_tracing_is_switched_on_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_TRACING", "true")
    monkeypatch.setenv("CVSERVE_OTLP_ENDPOINT", "http://collector:4318/v1/traces")
    monkeypatch.setenv("CVSERVE_TRACING_SERVICE_NAME", "edge-gateway")
    settings = Settings(models=("detector",))
    assert (settings.tracing, settings.otlp_endpoint, settings.tracing_service_name) == (
        True, "http://collector:4318/v1/traces", "edge-gateway",
    )  # fmt: skip
    monkeypatch.setenv("CVSERVE_OTLP_ENDPOINT", "collector:4318")
    with pytest.raises(ValueError, match="otlp_endpoint must be an http"):
        Settings(models=("detector",))


def test_a_video_request_is_traced_like_its_server_timing(traced: Traced) -> None:
    from tests.video.clips import encode_video, moving_shapes

    header, trace_id, _ = traceparent()
    video = encode_video(moving_shapes(6).frames, "webm")
    response, spans = traced.spans_of_next_request(
        "/detect", content=video, headers={"Content-Type": "video/webm", "traceparent": header}
    )
    assert response.status_code == 200 and response.json()["video"]["frames"] == 6
    request = server_span(spans)
    assert request.trace_id == trace_id and request.attributes["cvserve.model"] == "detector"
    durations_ms, _ = parse(response.headers["Server-Timing"])
    stages = stage_spans(spans, request)
    assert set(stages) == {"read", "decode", "preprocess", "model", "postprocess", "encode"}
    for name, span in stages.items():
        assert span.duration_s * 1000 == pytest.approx(durations_ms[name], abs=TOLERANCE_MS), name


def test_an_oip_inference_request_gets_the_same_stage_spans(traced: Traced) -> None:
    """/v2 infer runs through the same request core as the task routes: stage spans and Server-Timing too."""
    header, trace_id, client_span_id = traceparent()
    infer = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                         "data": [base64.b64encode(png(3)).decode()]}]}  # fmt: skip
    response, spans = traced.spans_of_next_request(
        "/v2/models/detector/infer", json=infer, headers={"traceparent": header}
    )
    assert response.status_code == 200, response.text
    request = server_span(spans)
    assert request.trace_id == trace_id and request.parent_span_id == client_span_id
    assert request.attributes["cvserve.endpoint"] == "/detect" and request.attributes["cvserve.images"] == 1
    stages = stage_spans(spans, request)
    assert set(stages) == set(STAGES)
    durations_ms, _ = parse(response.headers["Server-Timing"])
    for name, span in stages.items():
        assert span.duration_s * 1000 == pytest.approx(durations_ms[name], abs=TOLERANCE_MS), name
