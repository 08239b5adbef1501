"""Triton backend: send each image to tritonserver (gRPC asyncio by default, HTTP as an option).

Triton's dynamic batcher batches concurrent calls, so this backend sends one `[1,3,H,W]` image
per call and never batches itself. Triton's error text is logged, never passed to clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.backends.base import Backend, BackendTimeout, BackendUnavailable, MalformedAnswer, VersionRefused, check_outputs
from service.contract import ModelContract, load_contract
from service.telemetry.metrics import LATENCY_BOUNDARIES, Instruments
from service.settings import Settings
from service.telemetry.tracing import inject_headers

log = logging.getLogger(__name__)

# gRPC retries a lost connection with exponential backoff (up to 120 s by default); cap it so the
# gateway notices a restarted Triton within about a second. Keepalive pings during calls find a
# dead connection (a frozen or partitioned Triton) in about 2 s; Triton must accept pings that often
# (`TRITON_KEEPALIVE_FLAGS`, set by stack/, docker-compose.yml and deploy/k8s/triton.yaml).
_GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]
# tritonserver flags that let the gateway's keepalive pings through (without them Triton answers
# pings more often than every 5 minutes with GOAWAY "too_many_pings").
TRITON_KEEPALIVE_FLAGS = (
    "--grpc-keepalive-time=10000",
    "--grpc-keepalive-timeout=2000",
    "--grpc-http2-min-recv-ping-interval-without-data=500",
    "--grpc-http2-max-ping-strikes=0",
)
# tritonserver's gRPC frontend reads a call's `traceparent` metadata as a C string, past its end
# (`GrpcServerCarrier::Get` in src/grpc/infer_handler.h returns `string_ref.data()` without its size;
# unfixed upstream as of 2026): whenever the byte after the value is not NUL the context is invalid and
# Triton starts a trace of its own. Measured with the bundled 2.51: 2 of 40 and 2 of 60 sequential gRPC
# calls lost their context, 0 of 60 over HTTP (whose headers are NUL-terminated).
GRPC_TRACE_CONTEXT_WARNING = (
    "tracing with triton_protocol=grpc: tritonserver's gRPC frontend drops the trace context of some "
    "calls (a few percent), so their Triton spans start traces of their own; set "
    "CVSERVE_TRITON_PROTOCOL=http (and CVSERVE_TRITON_URL to Triton's HTTP port) for whole traces"
)
_READY_TIMEOUT_S = 2.0
# The header that unlocks tritonserver's restricted model-repository API (stack.triton starts it so;
# gRPC metadata carries it with Triton's protocol prefix).
TRITON_ADMIN_HEADER = "cvserve-triton-admin"
_LOAD_TIMEOUT_S = 600.0  # a python-backend stub importing torch on a busy 2-core machine is slow
# While calls are in flight, Triton is probed this often; a probe unanswered for _PROBE_TIMEOUT_S
# with no call answered meanwhile marks it frozen: calls in flight and new ones get 503 at once,
# until a probe is answered again. (Under load calls keep finishing, so a slow probe alone never trips it.)
_PROBE_INTERVAL_S = 0.25
_PROBE_TIMEOUT_S = 1.0


class TritonBackend(Backend):
    """Backend that runs models on a tritonserver; see `service.backends.base.Backend`.

    Serves `settings.models` unless `models` names others (tests use tiny models).

    Versions (`load_version`, `unload_version`, `infer_many(..., version=)`) go through Triton's own model
    repository API: the model is loaded again with a `version_policy` naming exactly the versions to hold,
    so Triton loads a new one (running its config's `model_warmup` at every batch size) beside those that
    serve, which stay as they are. That needs tritonserver in `--model-control-mode=explicit` and, when
    its repository API is restricted, `settings.triton_admin_token`.
    """

    supports_versions = True

    def __init__(
        self, settings: Settings, models: Sequence[str] | None = None, instruments: Instruments | None = None
    ) -> None:
        self._url = settings.triton_url
        self._protocol = settings.triton_protocol
        self._timeout_s = float(settings.request_timeout_s)
        self._propagate = settings.tracing  # pass each request's trace context on to Triton
        if self._propagate and self._protocol == "grpc":
            log.warning(GRPC_TRACE_CONTEXT_WARNING)
        self._contracts: dict[str, ModelContract] = {
            name: load_contract(settings.model_repository, name) for name in (models or settings.models)
        }
        token = settings.triton_admin_token.get_secret_value() if settings.triton_admin_token else None
        key = TRITON_ADMIN_HEADER if self._protocol == "http" else f"triton-grpc-protocol-{TRITON_ADMIN_HEADER}"
        self._admin_headers = {key: token} if token else None
        self._versions: dict[str, list[str]] = {}  # model → versions loaded through load_version (else unknown)
        self._version_lock = asyncio.Lock()
        self._client: Any = None  # created on first use, inside the serving event loop
        self._was_ready: bool | None = None
        self._in_flight = 0
        self._last_answer = time.monotonic()
        self._frozen: asyncio.Event | None = None  # set while Triton is found frozen (watchdog)
        self._watchdog: asyncio.Task[None] | None = None
        self._latency = (instruments or Instruments.prometheus()).histogram(
            "cvserve_model_latency_seconds",
            description="Time for one batch through the model.",  # here: one call, Triton batches
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "backend"),
        )

    def _get_client(self) -> Any:
        if self._client is None:
            if self._protocol == "grpc":
                self._client = grpc_aio.InferenceServerClient(self._url, channel_args=_GRPC_CHANNEL_ARGS)
            else:
                # Deadlines are enforced per call below; aiohttp's session timeout only backs them up.
                session_timeout_s = max(self._timeout_s, _READY_TIMEOUT_S) + 1.0
                self._client = http_aio.InferenceServerClient(self._url, conn_timeout=session_timeout_s)
        return self._client

    def _inputs(self, contract: ModelContract, image: np.ndarray) -> tuple[list[Any], list[Any]]:
        (spec,) = contract.inputs
        if image.shape != spec.dims or image.dtype != np.dtype(spec.dtype):
            raise ValueError(
                f"{contract.name} expects {spec.dtype}{list(spec.dims)}, got {image.dtype}{list(image.shape)}"
            )
        batch = np.ascontiguousarray(image[np.newaxis])
        module = grpc_aio if self._protocol == "grpc" else http_aio
        infer_input = module.InferInput(spec.name, list(batch.shape), np_to_triton_dtype(batch.dtype))
        if self._protocol == "grpc":
            infer_input.set_data_from_numpy(batch)
            outputs = [grpc_aio.InferRequestedOutput(out.name) for out in contract.outputs]
        else:
            infer_input.set_data_from_numpy(batch, binary_data=True)
            outputs = [http_aio.InferRequestedOutput(out.name, binary_data=True) for out in contract.outputs]
        return [infer_input], outputs

    async def infer_many(
        self,
        model: str,
        images: Sequence[np.ndarray],
        timings: Sequence[Any] | None = None,
        version: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Every image of one request concurrently (Triton's dynamic batcher batches them), on `version`."""
        began = time.perf_counter()
        outputs = list(await asyncio.gather(*(self.infer(model, image, version) for image in images)))
        for timing in timings or ():
            timing.model_s = time.perf_counter() - began
        return outputs

    # ---- versions, through Triton's model repository API ----

    def loaded_versions(self, model: str) -> list[str]:
        return list(self._versions.get(model, []))

    async def _ready_versions(self, model: str) -> list[str]:
        """The versions of `model` Triton holds READY now (its repository index)."""
        client = self._get_client()
        index = await client.get_model_repository_index(headers=self._admin_headers)
        rows = index if isinstance(index, list) else _json(client, index).get("models", [])
        ready = {str(row.get("version")) for row in rows if row.get("name") == model and row.get("state") == "READY"}
        return sorted((v for v in ready if v.isdigit()), key=int)

    async def _hold(self, model: str, versions: Sequence[str]) -> None:
        """Load `model` again with a version policy naming exactly `versions` (Triton keeps unchanged ones)."""
        client = self._get_client()
        config = await client.get_model_config(model, headers=self._admin_headers)
        config = _json(client, config)
        config = config.get("config", config)
        config["version_policy"] = {"specific": {"versions": sorted({int(v) for v in versions})}}
        call = client.load_model(model, headers=self._admin_headers, config=json.dumps(config))
        await asyncio.wait_for(call, _LOAD_TIMEOUT_S)

    async def load_version(self, model: str, version: str) -> None:
        """Have Triton load `version` beside the versions it serves (warmed up by its `model_warmup`), then
        check one answer of it against the contract; `VersionRefused` with Triton's reason otherwise (and the
        versions that served before are held as they were)."""
        contract = self._contracts[model]
        async with self._version_lock:
            try:
                before = await self._ready_versions(model)
            except (InferenceServerException, aiohttp.ClientError, OSError) as error:
                raise VersionRefused(f"Triton's repository index is not available: {_message(error)}") from error
            if version in before:
                self._versions[model] = before
                return
            try:
                await self._hold(model, [*before, version])
                if not await self._get_client().is_model_ready(model, version):
                    raise VersionRefused(f"Triton did not make {model} v{version} ready")
                rng = np.random.default_rng(1)
                probe = rng.integers(0, 256, contract.inputs[0].dims, dtype=np.uint8)
                check_outputs(contract, await self.infer(model, probe, version))
            except Exception as error:
                await self._restore(model, before)
                if isinstance(error, VersionRefused):
                    raise
                reason = "breaks its contract" if isinstance(error, MalformedAnswer) else "failed to load on Triton"
                raise VersionRefused(f"{model} v{version} {reason}: {_message(error)}") from error
            self._versions[model] = await self._ready_versions(model)
            log.info("Triton loaded %s v%s (holding %s)", model, version, self._versions[model])

    async def _restore(self, model: str, versions: list[str]) -> None:
        """After a refused load: hold `versions` again (what served before), if Triton lets go of the new one."""
        try:
            if await self._ready_versions(model) != versions and versions:
                await self._hold(model, versions)
        except Exception:  # what served keeps serving; the log says why the clean-up failed
            log.exception("Triton: could not restore %s to versions %s", model, versions)

    async def unload_version(self, model: str, version: str) -> None:
        """Have Triton hold every version of `model` it holds now but `version` (it drains its requests)."""
        async with self._version_lock:
            ready = await self._ready_versions(model)
            keep = [v for v in ready if v != version]
            if keep and keep != ready:
                await self._hold(model, keep)
            self._versions[model] = await self._ready_versions(model)

    async def infer(self, model: str, image: np.ndarray, version: str | None = None) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image through `model` (its `version`, or Triton's choice) on Triton;
        outputs without batch dim."""
        contract = self._contracts.get(model)
        if contract is None:
            raise KeyError(f"unknown model {model!r}; known: {sorted(self._contracts)}")
        inputs, outputs = self._inputs(contract, image)
        client = self._get_client()
        frozen = self._watch()
        if frozen.is_set():
            raise BackendUnavailable(f"Triton is not answering; model {model} cannot answer now")
        started = time.perf_counter()
        self._in_flight += 1
        headers = inject_headers() if self._propagate else None  # gRPC metadata or HTTP headers
        try:
            if self._protocol == "grpc":
                call = client.infer(
                    model, inputs, model_version=version or "", outputs=outputs, client_timeout=self._timeout_s,
                    headers=headers,
                )  # fmt: skip
            else:
                call = asyncio.wait_for(
                    client.infer(model, inputs, model_version=version or "", outputs=outputs, headers=headers),
                    self._timeout_s,
                )
            result = await _unless(call, frozen)
        except _Frozen as error:
            raise BackendUnavailable(f"Triton stopped answering; model {model} cannot answer now") from error
        except TimeoutError as error:
            raise BackendTimeout(f"model {model} did not answer within {self._timeout_s:g} s") from error
        except InferenceServerException as error:
            raise self._translate(model, error) from error
        except aiohttp.ClientError as error:
            log.warning("Triton HTTP call for %s failed: %r", model, error)
            raise BackendUnavailable(f"Triton is unreachable; model {model} cannot answer now") from error
        finally:
            self._in_flight -= 1
        self._last_answer = time.monotonic()
        self._latency.observe(time.perf_counter() - started, tags={"model": model, "backend": "triton"})
        return {out.name: np.array(result.as_numpy(out.name)[0]) for out in contract.outputs}

    def _watch(self) -> asyncio.Event:
        """The frozen flag, with the watchdog that sets and clears it running."""
        if self._frozen is None:
            self._frozen = asyncio.Event()
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_triton())
        return self._frozen

    async def _watch_triton(self) -> None:
        """Probe Triton while calls are in flight (or it is frozen); flag it frozen when it stops answering."""
        assert self._frozen is not None
        while True:
            await asyncio.sleep(_PROBE_INTERVAL_S)
            if not self._in_flight and not self._frozen.is_set():
                continue
            probe_started = time.monotonic()
            try:
                answered = await asyncio.wait_for(self._get_client().is_server_live(), _PROBE_TIMEOUT_S)
            except Exception:  # noqa: BLE001  any failure of a liveness probe means "no answer"
                answered = False
            if answered:
                if self._frozen.is_set():
                    log.warning("Triton at %s answers again", self._url)
                    self._frozen = asyncio.Event()  # a fresh flag: calls from now on wait on it
            elif not self._frozen.is_set() and self._last_answer < probe_started:
                log.warning("Triton at %s stopped answering: failing its calls with 503", self._url)
                self._frozen.set()

    def _translate(self, model: str, error: InferenceServerException) -> Exception:
        """Map a Triton error to 503/504 (or an internal error for a malformed request); log its text."""
        status = str(error.status() or "")
        log.warning("Triton call for %s failed: status=%s message=%s", model, status, error.message())
        if status in (str(grpc.StatusCode.DEADLINE_EXCEEDED), "504"):
            return BackendTimeout(f"model {model} did not answer within {self._timeout_s:g} s")
        if status == str(grpc.StatusCode.INVALID_ARGUMENT):
            return RuntimeError(f"Triton rejected the request for model {model} (see gateway log)")
        if status == str(grpc.StatusCode.UNAVAILABLE):
            return BackendUnavailable(f"Triton is unreachable; model {model} cannot answer now")
        return BackendUnavailable(f"model {model} is not available on Triton now")

    async def ready(self) -> bool:
        """Whether Triton is live and ready and every model is ready (short timeout, never raises)."""
        try:
            ready = await asyncio.wait_for(self._check_ready(), _READY_TIMEOUT_S)
        except (TimeoutError, InferenceServerException, aiohttp.ClientError, OSError) as error:
            if self._was_ready is not False:
                log.warning("Triton at %s is not reachable: %r", self._url, error)
            ready = False
        if ready != self._was_ready:
            log.info("Triton at %s (%s) ready: %s", self._url, self._protocol, ready)
            self._was_ready = ready
        return ready

    async def _check_ready(self) -> bool:
        client = self._get_client()
        if not (await client.is_server_live() and await client.is_server_ready()):
            return False
        states = await asyncio.gather(*(client.is_model_ready(name) for name in self._contracts))
        return all(states)

    async def close(self) -> None:
        """Close the connection to Triton (idempotent)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _json(client: Any, answer: Any) -> Any:
    """A tritonclient answer as JSON-like data (the gRPC client's protobuf messages converted)."""
    if isinstance(answer, dict | list):
        return answer
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(answer, preserving_proto_field_name=True)


def _message(error: BaseException) -> str:
    return error.message() if isinstance(error, InferenceServerException) else str(error)


class _Frozen(Exception):
    """The watchdog found Triton frozen while this call waited."""


async def _unless(call: Any, frozen: asyncio.Event) -> Any:
    """Await `call`, unless `frozen` is set first (then cancel it and raise `_Frozen`)."""
    task = asyncio.ensure_future(call)
    flag = asyncio.ensure_future(frozen.wait())
    try:
        await asyncio.wait((task, flag), return_when=asyncio.FIRST_COMPLETED)
    finally:
        flag.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise _Frozen
    return task.result()
