"""Prometheus metrics of the gateway (names and tags as in docs/ARCHITECTURE.md).

The metrics are made by an `Instruments`: under Ray Serve, `ray.util.metrics` inside each replica
(`RAY_INSTRUMENTS` in `service.deploy.models`), so Ray's metrics agent exports and sums them across
replicas (Ray prefixes the names with `ray_`); anywhere else (plain uvicorn, tests), prometheus_client
in a registry of the app's own, served at the app's `/metrics`. Build these per app or replica,
never at import time.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import prometheus_client

from service.timing import Timings


class Instrument(Protocol):
    """What the gateway calls on a metric (the `ray.util.metrics` API): each kind uses its own method."""

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None: ...


class _Prometheus:
    """A prometheus_client metric behind the `ray.util.metrics` call shape (`tags=` instead of `labels()`)."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric

    def _child(self, tags: Mapping[str, str] | None) -> Any:
        return self._metric.labels(**tags) if tags else self._metric

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).inc(value)

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).set(value)

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._child(tags).observe(value)


@dataclass(frozen=True)
class Instruments:
    """Makers of counters, gauges and histograms: `ray.util.metrics` under Serve, prometheus_client elsewhere."""

    counter: Callable[..., Instrument]  # (name, description=, tag_keys=)
    gauge: Callable[..., Instrument]  # (name, description=, tag_keys=)
    histogram: Callable[..., Instrument]  # (name, description=, boundaries=, tag_keys=)
    registry: prometheus_client.CollectorRegistry | None = field(default=None, compare=False)  # None: Ray exports

    @classmethod
    def prometheus(cls) -> Instruments:
        """prometheus_client metrics in a new registry (so several apps can live in one process).

        As with `ray.util.metrics`, asking twice for one name (one per model, say) gives the same
        metric; prometheus_client alone would refuse the second as a duplicate time series.
        """
        registry = prometheus_client.CollectorRegistry()
        return cls._prometheus(registry, registry, None)

    @classmethod
    def prometheus_multiprocess(cls, directory: str) -> Instruments:
        """prometheus_client metrics shared by the processes that write into `directory` (several uvicorn
        workers of one app): each process's values go to files there, and `registry` collects all of them,
        so any worker's `/metrics` answers for every worker. The process must have started with
        PROMETHEUS_MULTIPROC_DIR=`directory` (prometheus_client reads it when imported). Gauges add up
        over the live processes, except the model version, which they share."""
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return cls._prometheus(None, registry, lambda name: SHARED_GAUGES.get(name, "livesum"))

    @classmethod
    def _prometheus(
        cls,
        register_in: prometheus_client.CollectorRegistry | None,
        registry: prometheus_client.CollectorRegistry,
        gauge_mode: Callable[[str], str] | None,
    ) -> Instruments:
        """Metrics registered in `register_in` (None: in no registry, as multiprocess mode wants), served
        from `registry`; `gauge_mode`: each gauge's multiprocess mode by name (None: not multiprocess)."""
        made: dict[str, _Prometheus] = {}

        def once(name: str, make: Callable[[], Any]) -> Instrument:
            if name not in made:
                made[name] = _Prometheus(make())
            return made[name]

        def counter(name: str, description: str = "", tag_keys: Sequence[str] = ()) -> Instrument:
            return once(
                name, lambda: prometheus_client.Counter(name, description, tag_keys, registry=register_in)
            )

        def gauge(name: str, description: str = "", tag_keys: Sequence[str] = ()) -> Instrument:
            mode = {} if gauge_mode is None else {"multiprocess_mode": gauge_mode(name)}
            return once(
                name,
                lambda: prometheus_client.Gauge(name, description, tag_keys, registry=register_in, **mode),
            )

        def histogram(
            name: str, description: str = "", boundaries: Sequence[float] = (), tag_keys: Sequence[str] = ()
        ) -> Instrument:
            buckets = (*boundaries, float("inf"))
            return once(
                name,
                lambda: prometheus_client.Histogram(
                    name, description, tag_keys, registry=register_in, buckets=buckets
                ),
            )

        return cls(counter, gauge, histogram, registry)


# Gauges every process sets to the same value: one figure, not their sum, across processes.
SHARED_GAUGES = {"cvserve_model_version": "livemax"}

# HTTP status → `kind` tag of cvserve_errors (docs/ARCHITECTURE.md)
ERROR_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media",
    422: "invalid_request",
    499: "client_closed",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first": recorded, never sent

LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
# Stages last from 0.1 ms to seconds, and Ray's _sum is made of bucket midpoints: finer buckets keep the
# dashboard's mean per stage within about 20% of the Server-Timing figures.
STAGE_BOUNDARIES = [
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
]  # fmt: skip
# Ray exports a histogram's _sum from bucket midpoints: boundaries halfway between integers make
# every count up to 32 its own bucket, so sums (mean batch size, images per request) are exact.
COUNT_BOUNDARIES = [n + 0.5 for n in range(33)] + [48.5, 64.5, 128.5, 256.5]


class GatewayMetrics:
    """Per-request metrics recorded by the ingress."""

    def __init__(self, instruments: Instruments) -> None:
        Counter, Gauge, Histogram = instruments.counter, instruments.gauge, instruments.histogram  # noqa: N806
        self.requests = Counter(
            "cvserve_requests", description="HTTP requests answered.", tag_keys=("endpoint", "status")
        )
        self.latency = Histogram(
            "cvserve_request_latency_seconds",
            description="Time from request to response in the ingress.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("endpoint",),
        )
        self.images = Histogram(
            "cvserve_images_per_request",
            description="Images in one request.",
            boundaries=COUNT_BOUNDARIES,
            tag_keys=("endpoint",),
        )
        self.in_flight = Gauge(
            "cvserve_in_flight_requests", description="Requests being processed now.", tag_keys=("endpoint",)
        )
        self.errors = Counter(
            "cvserve_errors", description="Failed requests by kind of failure.", tag_keys=("endpoint", "kind")
        )
        self.stages = Histogram(
            "cvserve_stage_seconds",
            description="Time one request spent in each stage (service/timing.py).",
            boundaries=STAGE_BOUNDARIES,
            tag_keys=("endpoint", "stage"),
        )
        self.batch_of_request = Histogram(
            "cvserve_request_batch_size",
            description="Largest model batch a request's images ran in.",
            boundaries=COUNT_BOUNDARIES,
            tag_keys=("endpoint",),
        )
        self._in_flight: Tally[str] = Tally()
        self.answered: Tally[tuple[str, int]] = Tally()  # (endpoint, status) → requests, in this replica
        self.streams = Gauge(
            "cvserve_streams_open", description="WebSocket frame streams open now.", tag_keys=("endpoint",)
        )
        self.stream_frames = Counter(
            "cvserve_stream_frames", description="Streamed frames answered.", tag_keys=("endpoint",)
        )
        self.dropped_frames = Counter(
            "cvserve_stream_dropped_frames",
            description="Streamed frames dropped unanswered: 'stale' (a newer frame arrived first) or 'rate' "
            "(sent faster than stream_max_fps).",
            tag_keys=("endpoint", "reason"),
        )
        self.video_frames = Counter(
            "cvserve_video_frames", description="Frames of uploaded videos answered.", tag_keys=("endpoint",)
        )
        self.explain_seconds = Histogram(
            "cvserve_explain_seconds",
            description="Time one request's explanations took (extra passes and maps), by model and method.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "method"),
        )
        self.explain_passes = Counter(
            "cvserve_explain_passes",
            description="Extra model passes run for explanations (occluded copies; a gradient counts 2).",
            tag_keys=("model", "method"),
        )
        self._streams: Tally[str] = Tally()
        self.dropped: Tally[tuple[str, str]] = Tally()  # (endpoint, reason) → dropped frames, in this replica

    def stream_opened(self, endpoint: str) -> None:
        """Count a WebSocket stream as open."""
        self._streams[endpoint] += 1
        self.streams.set(self._streams[endpoint], tags={"endpoint": endpoint})

    def stream_closed(self, endpoint: str) -> None:
        """Count a WebSocket stream as closed."""
        self._streams[endpoint] -= 1
        self.streams.set(self._streams[endpoint], tags={"endpoint": endpoint})

    def open_streams(self) -> int:
        """WebSocket streams open now in this replica, all endpoints together."""
        return sum(self._streams.values())

    def frame_dropped(self, endpoint: str, reason: str) -> None:
        """Count a streamed frame dropped unanswered, and why."""
        self.dropped[endpoint, reason] += 1
        self.dropped_frames.inc(tags={"endpoint": endpoint, "reason": reason})

    def explained(self, model: str, method: str, seconds: float, passes: int) -> None:
        """Record one request's explanations: how long they took and how many extra passes they ran."""
        tags = {"model": model, "method": method}
        self.explain_seconds.observe(seconds, tags=tags)
        self.explain_passes.inc(passes, tags=tags)

    def observe_stages(self, endpoint: str, timings: Timings) -> None:
        """Record where one answered request's time went."""
        for stage, seconds in timings.seconds.items():
            self.stages.observe(seconds, tags={"endpoint": endpoint, "stage": stage})
        if timings.batch_size:
            self.batch_of_request.observe(timings.batch_size, tags={"endpoint": endpoint})

    def request_started(self, endpoint: str) -> None:
        """Count a request as in flight."""
        self._in_flight[endpoint] += 1
        self.in_flight.set(self._in_flight[endpoint], tags={"endpoint": endpoint})

    def request_finished(self, endpoint: str, status: int, seconds: float, error_kind: str | None) -> None:
        """Record a finished request: its status, latency and, for failures, the kind of error."""
        self._in_flight[endpoint] -= 1
        self.in_flight.set(self._in_flight[endpoint], tags={"endpoint": endpoint})
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.answered[endpoint, status] += 1
        self.latency.observe(seconds, tags={"endpoint": endpoint})
        if error_kind is not None:
            self.errors.inc(tags={"endpoint": endpoint, "kind": error_kind})


class ModelMetrics:
    """Per-batch metrics recorded by an embedded model replica."""

    def __init__(self, model: str, backend: str, instruments: Instruments) -> None:
        Histogram = instruments.histogram  # noqa: N806
        self._tags = {"model": model}
        self._latency_tags = {"model": model, "backend": backend}
        self.batch_size = Histogram(
            "cvserve_batch_size", description="Images per model batch.", boundaries=COUNT_BOUNDARIES, tag_keys=("model",)
        )
        self.latency = Histogram(
            "cvserve_model_latency_seconds",
            description="Time for one batch through the model.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "backend"),
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one batch of `size` images that took `seconds`."""
        self.batch_size.observe(size, tags=self._tags)
        self.latency.observe(seconds, tags=self._latency_tags)


class LifecycleMetrics:
    """Model versions and how a candidate version agrees with the current one (service/core/versions.py).

    Agreement is exported as two counters, the sum of a measure over compared images and the number of
    images, so that a rate ratio is its exact mean over any window (a histogram's `_sum` under Ray is made
    of bucket midpoints)."""

    def __init__(self, instruments: Instruments) -> None:
        Counter, Gauge = instruments.counter, instruments.gauge  # noqa: N806
        self.version = Gauge(
            "cvserve_model_version", description="The version serving a model now (its current version).", tag_keys=("model",)
        )
        self.changes = Counter(
            "cvserve_model_version_changes",
            description="Lifecycle changes: load, rollback, unload, candidate, promote, load_refused.",
            tag_keys=("model", "action"),
        )
        self.requests = Counter(
            "cvserve_candidate_requests",
            description="Requests routed to a candidate's comparison, by outcome (compared, dropped_busy, "
            "dropped_queue, failed).",
            tag_keys=("model", "version", "mode", "outcome"),
        )
        self.agreement = Counter(
            "cvserve_candidate_agreement",
            description="Sum over compared images of an agreement measure between the candidate and the current "
            "version (divide by cvserve_candidate_images for the mean).",
            tag_keys=("model", "version", "measure"),
        )
        self.images = Counter(
            "cvserve_candidate_images",
            description="Images compared between the candidate and the current version, per measure.",
            tag_keys=("model", "version", "measure"),
        )

    def current(self, model: str, version: str) -> None:
        self.version.set(float(version) if version.isdigit() else 0.0, tags={"model": model})

    def change(self, model: str, action: str) -> None:
        self.changes.inc(tags={"model": model, "action": action})

    def candidate_request(self, model: str, version: str, mode: str, outcome: str) -> None:
        self.requests.inc(tags={"model": model, "version": version, "mode": mode, "outcome": outcome})

    def agreement_of(self, model: str, version: str, measures: Mapping[str, float]) -> None:
        for measure, value in measures.items():
            tags = {"model": model, "version": version, "measure": measure}
            if value > 0:  # Ray's counters take positive increments only; a zero leaves the sum as it is
                self.agreement.inc(value, tags=tags)
            self.images.inc(tags=tags)
