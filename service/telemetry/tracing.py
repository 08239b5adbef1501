"""OpenTelemetry traces of gateway requests, built from the same `Timings` as `Server-Timing`.

Off by default (`CVSERVE_TRACING`): `Tracing.from_settings` then returns None, no tracer provider
exists and no request makes a span. On, each HTTP request (but the `/health` and `/ready` probes)
is one server span (`POST /detect`)
whose parent is the client's W3C `traceparent` when it sent a valid one (anything else starts a new
trace: a bad header never fails a request). After the answer, one child span per stage is made from
the request's `Timings`: each exactly as long as `Server-Timing` says. Their placement is rebuilt
from those durations (the stages before the backend laid forward from the request's start, the
rest back from the end of `encode`); `decode` and `preprocess` are summed over a request's images,
which run in parallel, so with several images they can overlap the stages after them. The Triton
backend passes the request's context on (`inject_headers`), so Triton's own spans join the trace.
Spans leave through a `BatchSpanProcessor` (a background thread) to an OTLP/HTTP endpoint.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from service.telemetry.asgi import ResponseStatus, route_path
from service.telemetry.metrics import CLIENT_CLOSED
from service.timing import ORDERED_STAGES, Timings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from service.settings import Settings

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C trace context only, whatever OTEL_PROPAGATORS says
_CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate"})
# Probes (orchestrators and compose healthchecks call them every few seconds) make no traces.
UNTRACED_PATHS = frozenset({"/health", "/ready"})
# Stages before the backend call start where the request started; the others end where encode ended.
_FORWARD_STAGES = ("read", "decode", "preprocess")
_BACKWARD_STAGES = tuple(reversed([stage for stage in ORDERED_STAGES if stage not in _FORWARD_STAGES]))


class Tracing:
    """One gateway replica's tracer: its provider, the server-span middleware and the stage spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("cvserve.gateway")

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """A tracer exporting to `settings.otlp_endpoint`, or None when tracing is off (nothing set up)."""
        if not settings.tracing:
            return None
        # Imported only when tracing is on (the exporter's HTTP session among them).
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        resource = Resource.create({"service.name": settings.tracing_service_name})
        # Not the global provider: each app (a replica, a test) owns its own and shuts it down.
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        return cls(provider)

    def record_stages(self, timings: Timings, attributes: dict[str, str | int]) -> None:
        """Add `attributes` to the current request's span and one child span per stage `timings` measured."""
        request_span = trace.get_current_span()
        if not request_span.is_recording():
            return
        request_span.set_attributes(attributes)
        if timings.batch_size:
            request_span.set_attribute("cvserve.batch_size", timings.batch_size)
        parent = trace.set_span_in_context(request_span)
        now_ns = time.perf_counter_ns()
        epoch_offset_ns = time.time_ns() - now_ns  # perf_counter readings → span times (ns since the epoch)
        durations_ns = {stage: round(seconds * 1e9) for stage, seconds in timings.seconds.items()}
        spans: list[tuple[str, int, int]] = []
        start_ns = round(timings.started * 1e9)
        for stage in (s for s in _FORWARD_STAGES if s in durations_ns):
            spans.append((stage, start_ns, start_ns + durations_ns[stage]))
            start_ns += durations_ns[stage]
        end_ns = now_ns
        for stage in (s for s in _BACKWARD_STAGES if s in durations_ns):
            spans.append((stage, end_ns - durations_ns[stage], end_ns))
            end_ns -= durations_ns[stage]
        for stage, start_ns, end_ns in sorted(spans, key=lambda span: ORDERED_STAGES.index(span[0])):
            stage_attributes: dict[str, str | int] = {"cvserve.stage": stage}
            if stage == "model" and timings.batch_size:
                stage_attributes["cvserve.batch_size"] = timings.batch_size
            span = self.tracer.start_span(
                stage, context=parent, start_time=epoch_offset_ns + start_ns, attributes=stage_attributes
            )
            span.end(end_time=epoch_offset_ns + end_ns)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export every finished span now (tests, shutdown)."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporting thread (idempotent)."""
        self.provider.shutdown()


def inject_headers() -> dict[str, str]:
    """The current span's context as W3C headers (`traceparent`) for a call to another server."""
    headers: dict[str, str] = {}
    _PROPAGATOR.inject(headers)
    return headers


def _client_context(scope: Scope) -> dict[str, str]:
    """The request's `traceparent`/`tracestate` headers (latin-1, as HTTP sends them; never fails)."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name in _CONTEXT_HEADERS
    }


class TracingMiddleware:
    """One server span per HTTP request but the probes, current while the app answers it (plain ASGI)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracer = tracing.tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        carrier = _client_context(scope)
        parent = _PROPAGATOR.extract(carrier) if carrier else None  # an invalid header: no parent
        method = scope.get("method", "")
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )
        status = ResponseStatus(send)
        try:
            with trace.use_span(span, record_exception=True, set_status_on_exception=False):
                await self.app(scope, receive, status)
        except BaseException as error:
            if not isinstance(error, Exception):  # cancelled: the client went away (Serve cancels it)
                status.code = CLIENT_CLOSED
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)  # the matched route's template (FastAPI)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status.code)
            if status.code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
