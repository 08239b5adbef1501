"""A real OTLP/HTTP trace receiver for tests, the bench and the stack: spans in, kept in memory.

`OtlpReceiver()` listens on a free loopback port (a thread) and accepts what an OpenTelemetry
exporter sends to `POST /v1/traces`: an `ExportTraceServiceRequest` as protobuf (Python's
exporter) or as OTLP/JSON (tritonserver 2.51's opentelemetry-cpp exporter), plain or gzip. Each
span is kept as a `ReceivedSpan` with hex ids, so tests compare them with a `traceparent` as written.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from support.ports import free_port
from support.waiting import wait_for

TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
# OTLP/JSON writes these ids as hex, where protobuf's JSON mapping expects base64 for bytes.
_HEX_IDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span: ids as lowercase hex (`parent_span_id` is "" for a root), times in ns since the epoch."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0

    @property
    def service(self) -> str:
        """The exporting process's `service.name` resource attribute ("" if it sent none)."""
        return str(self.resource.get("service.name", ""))

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(value: AnyValue) -> Any:
    """A protobuf `AnyValue` as the Python value it holds."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _hex_ids_as_base64(value: Any) -> Any:
    """An OTLP/JSON document with its hex span and trace ids turned into protobuf JSON's base64."""
    if isinstance(value, dict):
        return {
            key: base64.b64encode(bytes.fromhex(item)).decode() if key in _HEX_IDS and isinstance(item, str)
            else _hex_ids_as_base64(item)
            for key, item in value.items()
        }  # fmt: skip
    if isinstance(value, list):
        return [_hex_ids_as_base64(item) for item in value]
    return value


def parse_export(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """One export request from its body: protobuf or OTLP/JSON (ValueError/DecodeError if it is neither)."""
    request = ExportTraceServiceRequest()
    kind = content_type.split(";")[0].strip()
    if kind == _PROTOBUF:
        request.ParseFromString(body)
    elif kind == _JSON:
        json_format.ParseDict(_hex_ids_as_base64(json.loads(body)), request, ignore_unknown_fields=True)
    else:
        raise ValueError(f"content type {content_type!r}, expected {_PROTOBUF} or {_JSON}")
    return request


def decode_spans(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """The spans of one export request, with their resource's attributes."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        resource=resource,
                        status_code=span.status.code,
                    )
                )
    return spans


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (`url` is what exporters are pointed at).

    Use it as a context manager, or `start()` / `stop()`. Bodies it cannot read get 400 and are
    counted in `rejected`, so a test sees a bad export instead of missing spans."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._spans: list[ReceivedSpan] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def start(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans received so far of trace `trace_id` (hex)."""
        return [span for span in self.spans() if span.trace_id == trace_id]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.rejected.clear()

    def wait_for_spans(
        self, condition: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 10.0, what: str = "spans"
    ) -> list[ReceivedSpan]:
        """Every span received, once `condition(spans)` holds (TimeoutError with what arrived otherwise)."""
        wait_for(
            lambda: condition(self.spans()),
            timeout_s,
            lambda: (
                f"{what}; received {[(s.service, s.name, s.trace_id) for s in self.spans()]}, "
                f"rejected {self.rejected}"
            ),
            0.05,
        )
        return self.spans()

    def _received(self, body: bytes, encoding: str, content_type: str) -> HTTPStatus:
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"content encoding {encoding!r}")
            spans = decode_spans(parse_export(body, content_type))
        except (ValueError, OSError, DecodeError, json_format.ParseError) as error:
            with self._lock:
                self.rejected.append(str(error))
            return HTTPStatus.BAD_REQUEST
        with self._lock:
            self._spans.extend(spans)
        return HTTPStatus.OK

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: exporters reuse their connection

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.split("?")[0] != TRACES_PATH:
                    self._reply(HTTPStatus.NOT_FOUND, b"", "text/plain")
                    return
                content_type = self.headers.get("Content-Type", "")
                status = receiver._received(body, self.headers.get("Content-Encoding", ""), content_type)
                if status != HTTPStatus.OK:
                    self._reply(status, b"", "text/plain")
                elif content_type.startswith(_JSON):
                    self._reply(status, b"{}", _JSON)  # an empty ExportTraceServiceResponse
                else:
                    self._reply(status, ExportTraceServiceResponse().SerializeToString(), _PROTOBUF)

            def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: no stderr line per export
                return

        return Handler
