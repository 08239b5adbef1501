"""Gateway configuration: one `Settings` object built from `CVSERVE_*` environment variables.

Build it once at start-up (`Settings()`) and pass it on; nothing reads the environment later.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

ImageFormat = Literal["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]

_MIB = 1024 * 1024


def _builtin_models() -> tuple[str, ...]:
    """The built-in tasks' models, the default (imported when settings are built: it loads torch)."""
    from tasks import MODELS

    return MODELS


def _registered_models() -> tuple[str, ...]:
    """Every model of the task registry as it is now (a task registered later is known too)."""
    from tasks import TASKS

    return tuple(TASKS)


def _split_csv(value: object) -> object:
    """Accept `a,b,c` from the environment as well as a list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the gateway can be told; each field maps to `CVSERVE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="CVSERVE_", extra="ignore", frozen=True)

    # where to listen (loopback unless told otherwise)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ray_metrics_port: int = Field(8090, ge=0, le=65535, description="Ray metrics agent's Prometheus port")
    ray_node_ip: str = Field(
        "127.0.0.1",
        description="address of `python -m service`'s own Ray (GCS, raylet, workers, agents, metrics "
        "export); loopback keeps them off the network. 'auto': Ray picks the machine's address (for a "
        "Prometheus in another container to reach ray_metrics_port); Ray's token guards its RPC ports",
    )
    # How HTTP reaches the gateway replicas. "haproxy" (default): Ray Serve's throughput mode (HAProxy
    # on host:port sends each request straight to a gateway replica's own HTTP server; replicas talk
    # gRPC), so no Python process sits between the socket and the gateway. "proxy": Serve's Python
    # proxy, an extra process hop (about half the throughput on 2 cores, loadtests/RESULTS.md).
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    haproxy_stats_port: int = Field(8404, ge=1, le=65535, description="HAProxy's stats page (ingress=haproxy)")
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535, description="HAProxy's metrics (ingress=haproxy)")
    haproxy_monitor_host: str = Field(
        "127.0.0.1", description="address of HAProxy's stats and metrics ports (ingress=haproxy)"
    )

    # which models, served how
    backend: Literal["embedded", "triton"] = "embedded"
    model_repository: Path = Path("model_repository")
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        default_factory=lambda: _builtin_models(), description="models to serve, from tasks.TASKS"
    )
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # JPEG decode and resize where the models are: the process that received the upload reads only the
    # header (format, size, EXIF orientation) and hands the file to the process that owns the models, which
    # decodes a batch's JPEGs together on the device (nvJPEG on a GPU; service/core/device_decode.py).
    # Other formats, and requests that are explained or compared with a candidate, decode on the CPU as
    # before. "auto": on when the embedded models run on CUDA; "on" also on a CPU (tests, the GPU check's
    # rehearsal); "off": never. A gateway with `off` sends decoded images even to an owner that decodes.
    device_decode: Literal["auto", "on", "off"] = "auto"
    # Embedded backend: "ingress" runs the models inside the gateway replica (one process from socket
    # to model: the fast path on one machine); "deployment" makes each model a Serve deployment of its
    # own that the gateway calls through handles (models scale and sit on GPUs apart from the HTTP front).
    model_placement: Literal["ingress", "deployment"] = "ingress"
    # Which file an embedded model runs: model.pt in TorchScript or model.onnx in ONNX Runtime (export writes
    # both, same contract, same answers). "auto": per model, the one measured faster on CPU
    # (service.backends.runtimes.CPU_DEFAULTS, loadtests/RESULTS.md); TorchScript on CUDA and for
    # repositories exported before model.onnx existed. The Triton backend ignores it (its repository decides).
    runtime: Literal["auto", "torchscript", "onnxruntime"] = "auto"
    # One intra-op thread: on CPU the replica decodes images in parallel with the model, and batching
    # (not intra-op threads) is what makes small models cheap per image (loadtests/RESULTS.md).
    torch_threads: int = Field(
        1, ge=1, description="intra-op threads per CPU model replica (TorchScript's and ONNX Runtime's)"
    )

    # batching and replicas (embedded backend)
    max_batch_size: int = Field(8, ge=1, le=256)
    warm_up_batch_sizes: bool = Field(
        True,
        description="embedded models run every batch size up to max_batch_size twice before the replica is "
        "ready, so no request pays for TorchScript's per-shape optimisation (false: one batch of one)",
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)
    model_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    model_num_cpus: float = Field(0.5, ge=0.0, description="Ray logical CPUs reserved per model replica")
    model_num_gpus: float = Field(0.25, ge=0.0, le=1.0, description="GPU share per model replica on cuda")
    ingress_num_cpus: float = Field(0.25, ge=0.0)

    # back-pressure and deadlines
    max_ongoing_requests: int = Field(64, ge=1, description="concurrent requests per replica")
    max_queued_requests: int = Field(256, ge=-1, description="queued calls per handle before 503; -1 = no limit")
    max_in_flight_requests: int | None = Field(
        None,
        ge=1,
        description="inference requests one ingress replica admits at once; more get 503 + Retry-After at once "
        "(default 3/4 of max_ongoing_requests; must stay below it so the excess reaches the gateway)",
    )
    max_in_flight_bytes: int = Field(
        96 * _MIB,
        ge=1024,
        description="request body bytes one ingress replica works on at once; a request past it gets 503 + "
        "Retry-After (one request alone is always admitted; max_body_bytes bounds it)",
    )
    max_in_flight_pixels: int = Field(
        128_000_000,
        ge=1,
        description="image pixels (as decoded) one ingress replica works on at once; past it: 503 + Retry-After "
        "(one request alone is always admitted; max_request_pixels bounds it)",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="time a client has to send the whole request body, before the request takes an admission "
        "slot; past it: 408",
    )
    stage_timings: bool = Field(
        True,
        description="time each request's stages (read, decode, preprocess, queue, model, postprocess, encode): "
        "a Server-Timing response header and the cvserve_stage_seconds histogram",
    )
    # OpenTelemetry traces (service/telemetry/tracing.py): off by default, and then no tracer exists at all
    tracing: bool = Field(
        False,
        description="one span per request (a child of the client's W3C traceparent) with a child span per "
        "stage, exported over OTLP/HTTP to otlp_endpoint; the Triton backend passes the context on",
    )
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP traces URL spans are sent to (tracing=true)"
    )
    tracing_service_name: str = Field("cvserve-gateway", min_length=1, description="service.name of the spans")
    request_timeout_s: float = Field(30.0, gt=0.0, description="deadline of a whole request; past it: 504")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of 503s for a full gateway or Serve queue")

    # Triton backend
    triton_url: str = "127.0.0.1:8011"
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_admin_token: SecretStr | None = Field(
        None,
        description="token of tritonserver's restricted model-repository API (the stack's runner sets one), for "
        "loading versions through /admin with the Triton backend (tritonserver in --model-control-mode=explicit)",
    )

    # limits on what clients may send
    max_body_bytes: int = Field(32 * _MIB, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    max_request_pixels: int = Field(
        64_000_000,
        ge=1,
        description="pixels of all images of one request together, read from their headers before any is "
        "decoded (a large JPEG counts at the reduced size it is decoded at); past it: 413",
    )
    max_response_bytes: int = Field(
        64 * _MIB,
        ge=1024,
        description="bytes of the images an answer carries (annotated images, return_png masks, as sent); past it: 413",
    )
    allowed_formats: Annotated[tuple[ImageFormat, ...], NoDecode] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

    # video: WebSocket frame streams (service/surfaces/streams.py) and video files (service/surfaces/video.py)
    stream_max_streams: int = Field(
        16, ge=1, description="WebSocket streams one ingress replica serves at once; past it: close 1013"
    )
    stream_max_fps: float = Field(
        30.0,
        gt=0.0,
        le=1000.0,
        description="frames per second one stream may send; faster frames are dropped unanswered (counted)",
    )
    stream_max_frame_bytes: int = Field(
        4 * _MIB, ge=1024, description="bytes of one streamed frame; past it the frame gets an error answer"
    )
    video_max_bytes: int = Field(64 * _MIB, ge=1024, description="bytes of one uploaded video; past it: 413")
    video_max_frames: int = Field(600, ge=1, description="frames of one uploaded video; past it: 413")
    video_max_duration_s: float = Field(60.0, gt=0.0, description="duration of one uploaded video; past it: 413")
    video_max_frame_pixels: int = Field(
        8_300_000, ge=1, description="pixels of one video frame (4K UHD by default); past it: 413"
    )
    video_timeout_s: float = Field(120.0, gt=0.0, description="deadline of one video request; past it: 504")

    # explanations (`explain=` on the task routes and /v2; service/core/explain.py)
    explain_default_grid: int = Field(
        8, ge=2, le=64, description="occlusion grid (cells per side) when a request names none"
    )
    explain_max_grid: int = Field(
        16, ge=2, le=64, description="largest grid a request may ask for (explain_grid); past it: 422"
    )
    explain_max_targets: int = Field(
        10,
        ge=1,
        le=100,
        description="detections (detector) or classes (segmenter) explained per image, best first; "
        "explain_top past it: 422",
    )
    explain_max_passes: int = Field(
        1040,
        ge=2,
        description="model passes one request's explanations may cost (images x (grid^2 + 1) for occlusion, "
        "images x 3 for saliency and gradcam); past it: 413",
    )
    max_in_flight_passes: int = Field(
        4160,
        ge=1,
        description="model passes (one per image, or an explanation's count) one ingress replica works on "
        "at once; past it: 503 + Retry-After (one request alone is always admitted; explain_max_passes bounds it)",
    )
    explain_timeout_s: float = Field(
        20.0, gt=0.0, description="time an explanation may take (within the request's deadline); past it: 504"
    )

    api_key: SecretStr | None = None
    # Listening on a network address without an API key is refused unless this says it is meant.
    allow_anonymous: bool = False

    # model lifecycle (service/core/versions.py, service/surfaces/admin.py)
    admin_key: SecretStr | None = Field(
        None,
        description="key of the admin surface (/admin: load, unload, rollback, candidate), sent as X-Admin-Key; "
        "without one the admin surface exists only on a loopback host",
    )
    repository_poll_s: float = Field(
        0.0,
        ge=0.0,
        description="seconds between looks at the model repository for a new version, loaded and made current "
        "once its files stop changing (0: no watcher; versions change through /admin only)",
    )
    shadow_max_pending: int = Field(
        4, ge=1, description="candidate comparisons running at once; past it a request's comparison is dropped"
    )
    shadow_busy_requests: int | None = Field(
        None,
        ge=2,
        description="admitted requests from which the gateway counts as busy and drops candidate comparisons "
        "first (default: the number of cores, at least 2; the request being compared counts as one)",
    )
    shadow_max_utilisation: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="candidate comparisons run in the gateway's idle time: one starts only when no request is "
        "in flight (waiting at most 2 s), and none is queued while requests have been in flight for more than "
        "this share of the last second or so (1: compare whatever the load, at the users' expense)",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _formats(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list | tuple):
            return [str(item).upper().replace("JPG", "JPEG") for item in value]
        return value

    @field_validator("models", "allowed_formats")
    @classmethod
    def _non_empty_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must name at least one entry")
        return tuple(dict.fromkeys(value))

    @field_validator("models")
    @classmethod
    def _registered(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = _registered_models()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown model {', '.join(unknown)}: choose from {', '.join(known)}")
        return value

    @field_validator("model_repository")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Ray replicas may run in another working directory than the process that built Settings.
        return value.expanduser().resolve()

    @field_validator("ray_node_ip", "haproxy_monitor_host")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        if value == "auto" and info.field_name == "ray_node_ip":
            return value
        if value != "localhost":
            ipaddress.ip_address(value)  # ValueError: not an address
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint must be an http(s) URL (http://127.0.0.1:4318/v1/traces), got {value!r}")
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError(f"{info.field_name} must be at least 16 characters (or unset)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}) or batches can never fill"
            )
        if self.max_in_flight_requests is not None and self.max_in_flight_requests >= self.max_ongoing_requests:
            raise ValueError(
                f"max_in_flight_requests ({self.max_in_flight_requests}) must be < max_ongoing_requests "
                f"({self.max_ongoing_requests}): Serve queues the rest before the gateway can refuse them"
            )
        if self.explain_default_grid > self.explain_max_grid:
            raise ValueError(
                f"explain_default_grid ({self.explain_default_grid}) must be <= explain_max_grid "
                f"({self.explain_max_grid})"
            )
        if not is_loopback(self.host) and self.api_key is None:
            if not self.allow_anonymous:
                raise ValueError(
                    f"host {self.host} is a network address and CVSERVE_API_KEY is unset: anyone on the "
                    "network could call the gateway. Set CVSERVE_API_KEY (16+ characters), or "
                    "CVSERVE_ALLOW_ANONYMOUS=true if that is meant, or CVSERVE_HOST=127.0.0.1"
                )
            log.warning("listening on %s without CVSERVE_API_KEY: anyone on the network can call it", self.host)
        return self

    @model_validator(mode="after")
    def _separate_admin_key(self) -> Settings:
        if self.admin_key is not None and self.api_key is not None:
            if self.admin_key.get_secret_value() == self.api_key.get_secret_value():
                raise ValueError("admin_key must differ from api_key: a client key must not change models")
        return self

    @property
    def shadow_busy_limit(self) -> int:
        """Admitted requests from which candidate comparisons are dropped (`shadow_busy_requests` or the cores)."""
        return self.shadow_busy_requests or max(2, os.cpu_count() or 2)

    @property
    def admin_open(self) -> bool:
        """Whether the admin surface is served: with an admin key, or without one on a loopback host only."""
        return self.admin_key is not None or is_loopback(self.host)

    @property
    def admission_limit(self) -> int:
        """Inference requests one ingress replica works on at once before answering 503."""
        if self.max_in_flight_requests is not None:
            return self.max_in_flight_requests
        return max(1, self.max_ongoing_requests * 3 // 4)

    @property
    def model_max_ongoing_requests(self) -> int:
        """Concurrent calls one model replica accepts: enough to fill a batch while another runs."""
        return max(self.max_ongoing_requests, 2 * self.max_batch_size)

    def decodes_on(self, device: str) -> bool:
        """Whether models on `device` ("cpu" or "cuda") decode the JPEGs of their batches (`device_decode`)."""
        return self.device_decode == "on" or (self.device_decode == "auto" and device == "cuda")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or "localhost") is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return (mapped or address).is_loopback
