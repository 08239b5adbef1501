"""Model lifecycle: which version of each model answers, and how a candidate version is judged.

Per model, `ModelVersions` holds one immutable `VersionState`: the current version, the previous one
(for rollback) and an optional candidate (`shadow`: gets a copy of a share of live traffic, its answers
are never returned; `canary`: answers a share of the traffic, or the requests that ask for it with the
`X-Cvserve-Canary` header). A request reads the state once (`route`) and runs on the versions it names,
so a change, which replaces the state under the model's lock (one reference swap), never touches a
request in flight: it finishes on the version it started on, and the old version stays loaded.

Loading (`load`): the backend loads the version beside the others, warms it up at every batch size and
checks its outputs against the contract (`Backend.load_version`); only then can it take traffic. A
version that fails is refused (`LifecycleError`, 422) with the reason, and what served keeps serving.

Comparison: for a routed request the other version (the candidate in shadow mode, the current one for a
canary request) runs on the same preprocessed images after the user's answer is computed, in a task of
its own, off the request's path, and in the gateway's idle time: it waits until no request is in flight
(at most `IDLE_WAIT_S`, then it is dropped), comparisons run one after another, and none is queued while
the gateway has had requests in flight for more than `shadow_max_utilisation` of the recent time. It is
bounded (at most `shadow_max_pending` waiting or running) and dropped first when the gateway is busy
(`Settings.shadow_busy_limit` requests admitted). On two cores a candidate's inference beside a user's
request slowed that request measurably (RESULTS "Model lifecycle"); in idle time it costs the users
nothing, and a gateway that is never idle compares nothing (the drops are counted). Each image's measures
(`service.core.agreement`) go to Prometheus (`LifecycleMetrics`) and to `summary()`.

`RepositoryWatcher` polls the repository (`repository_poll_s`) and loads a new highest version as current.
Every change is logged with who asked (`log` "cvserve.lifecycle").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.backends.base import Backend, MalformedAnswer, VersionRefused, check_outputs
from service.backends.torchscript import latest_version, repository_versions
from service.contract import ModelContract
from service.core.agreement import MEASURES, compare
from service.core.errors import ApiError
from service.settings import Settings
from service.telemetry.metrics import LifecycleMetrics

log = logging.getLogger("cvserve.lifecycle")

Mode = Literal["shadow", "canary"]
CANARY_HEADER = "x-cvserve-canary"
# How long a comparison waits for a moment with no request in flight before it is dropped ("busy").
IDLE_WAIT_S = 2.0
IDLE_POLL_S = 0.005


class LifecycleError(ApiError):
    """A lifecycle change that was refused (the state is unchanged)."""


@dataclass(frozen=True)
class Candidate:
    version: str
    mode: Mode
    share: float  # 0..1 of the requests that are routed to it (canary) or copied to it (shadow)


@dataclass(frozen=True)
class VersionState:
    """One model's versions as requests see them; replaced whole, never changed."""

    current: str
    previous: str | None = None
    candidate: Candidate | None = None


@dataclass(frozen=True)
class Ask:
    """What one request asked for: a version by name, or (canary header) for or against the canary."""

    version: str | None = None
    canary: bool | None = None


ASKED: ContextVar[Ask | None] = ContextVar("cvserve_version_asked", default=None)


@contextlib.contextmanager
def asked(version: str | None = None, canary: str | None = None) -> Iterator[None]:
    """The surfaces say what a request asked for (`version=`, `/versions/{v}`, the canary header) for the block."""
    flag = None if canary is None else canary.strip().lower() in ("1", "true", "yes", "always")
    token = ASKED.set(Ask(version, flag))
    try:
        yield
    finally:
        ASKED.reset(token)


@dataclass(frozen=True)
class Route:
    """Which version answers a request (`serve`) and which one, if any, is compared with it off the path."""

    serve: str
    other: str | None = None  # the version run for comparison
    candidate: str | None = None  # the candidate's version when one is compared
    mode: Mode | None = None

    def pair(self, served: list[Any], other: list[Any]) -> tuple[list[Any], list[Any]]:
        """(current's outputs, candidate's outputs) whichever of the two was served."""
        return (other, served) if self.serve == self.candidate else (served, other)


@dataclass
class Tally:
    """A candidate's comparisons so far, in this gateway replica."""

    version: str
    mode: Mode
    requests: int = 0
    images: int = 0
    sums: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        means = {name: (self.sums[name] / self.images if self.images else None) for name in self.sums}
        return {
            "version": self.version,
            "mode": self.mode,
            "compared_requests": self.requests,
            "compared_images": self.images,
            "dropped": dict(self.dropped),
            "mean": means,
        }


VERSION_FILE = "version.json"  # written by the export beside the weights: {"weights": "<source>"}


def version_weights(repository: Path, model: str, version: str, default: str) -> str:
    """Where a version's weights came from: its `version.json` (export), else the model's config `weights`."""
    try:
        return str(json.loads((repository / model / version / VERSION_FILE).read_text())["weights"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def who_of(key_id: str | None, client: str) -> str:
    """How the log names a caller."""
    return f"key {key_id} from {client}" if key_id else f"{client} (no admin key)"


class ModelVersions:
    """Every served model's versions: loading, switching, rollback, the candidate and its comparisons."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        contracts: Mapping[str, ModelContract],
        metrics: LifecycleMetrics,
        busy: Callable[[], int] = lambda: 0,
        utilisation: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.contracts = dict(contracts)
        self.metrics = metrics
        self._busy = busy  # requests admitted now (shadow work is dropped first past shadow_busy_requests)
        self._utilisation = utilisation  # the recent share of time with a request in flight
        self._idle_turn = asyncio.Lock()  # comparisons run one at a time, each in a moment of idleness
        self.states: dict[str, VersionState] = {}
        for model in contracts:
            loaded = backend.loaded_versions(model)
            start = loaded[-1] if loaded else latest_version(settings.model_repository, model)
            self.states[model] = VersionState(current=start)
            metrics.current(model, start)
        self.refused: dict[tuple[str, str], str] = {}  # (model, version) → why it was refused
        self.tallies: dict[str, Tally] = {}  # model → its candidate's comparisons
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._serving: Counter[tuple[str, str]] = Counter()  # (model, version) → requests routed to it, unfinished
        self._pending: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    # ---- reading (lock-free: one reference read) ----

    def current(self, model: str) -> str:
        return self.states[model].current

    def loaded(self, model: str) -> list[str]:
        """The versions that can answer now (the backend's, or the current one alone)."""
        return self.backend.loaded_versions(model) or [self.current(model)]

    def route(self, model: str) -> Route:
        """The versions this request runs on, from the state as it is now and what the request asked."""
        ask = ASKED.get() or Ask()
        state = self.states[model]
        if ask.version is not None:
            if ask.version not in self.loaded(model):
                raise ApiError(
                    404, "version_not_found", f"model {model} has no version {ask.version} loaded "
                    f"(loaded: {', '.join(self.loaded(model))})",
                )  # fmt: skip
            return Route(serve=ask.version)
        candidate = state.candidate
        if candidate is None:
            return Route(serve=state.current)
        if candidate.mode == "canary":
            to_canary = ask.canary if ask.canary is not None else self._random.random() < candidate.share
            if to_canary:
                return Route(candidate.version, state.current, candidate.version, "canary")
            return Route(serve=state.current)
        if self._random.random() < candidate.share:
            return Route(state.current, candidate.version, candidate.version, "shadow")
        return Route(serve=state.current)

    @contextlib.contextmanager
    def serving(self, model: str, route: Route) -> Iterator[None]:
        """The block answers a request on `route.serve`: that version is not unloaded before it ends."""
        key = (model, route.serve)
        self._serving[key] += 1
        try:
            yield
        finally:
            self._serving[key] -= 1

    async def _unused(self, model: str, version: str) -> None:
        """Wait (at most the request deadline) until no request routed to `version` is unfinished."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.request_timeout_s
        while self._serving[model, version] and loop.time() < until:
            await asyncio.sleep(0.02)

    # ---- comparison, off the request's path ----

    def compare_later(
        self,
        model: str,
        route: Route,
        tensors: Sequence[np.ndarray],
        served: list[dict[str, np.ndarray]],
        run: Callable[[str, list[np.ndarray]], Awaitable[list[dict[str, np.ndarray]]]],
    ) -> None:
        """Run `route.other` on `tensors` in a task of its own and record how it agrees with `served`,
        unless the gateway is busy or too much comparison work is pending (then it is dropped, counted)."""
        if route.other is None or route.candidate is None or route.mode is None:
            return
        tally = self._tally(model, route.candidate, route.mode)
        reason = None
        if self._busy() >= self.settings.shadow_busy_limit or self._too_busy():
            reason = "busy"
        elif len(self._pending) >= self.settings.shadow_max_pending:
            reason = "queue"
        if reason is not None:
            self._dropped(model, route, tally, reason)
            return
        task = asyncio.get_running_loop().create_task(self._compare(model, route, list(tensors), served, run, tally))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _compare(
        self,
        model: str,
        route: Route,
        tensors: list[np.ndarray],
        served: list[dict[str, np.ndarray]],
        run: Callable[[str, list[np.ndarray]], Awaitable[list[dict[str, np.ndarray]]]],
        tally: Tally,
    ) -> None:
        assert route.other is not None and route.candidate is not None and route.mode is not None
        contract = self.contracts[model]
        async with self._idle_turn if self._yields else contextlib.nullcontext():
            if self._yields and not await self._idle():
                self._dropped(model, route, tally, "busy")
                return
            try:
                other = await run(route.other, tensors)
                for output in other:
                    check_outputs(contract, output)
                current, candidate = route.pair(served, other)
                measures = [compare(contract.task, a, b) for a, b in zip(current, candidate, strict=True)]
            except Exception as error:  # the user already has the answer: a failed comparison is only counted
                log.warning("comparing %s v%s failed: %s", model, route.other, error)
                self._dropped(model, route, tally, "failed")
                return
        tally.requests += 1
        self.metrics.candidate_request(model, route.candidate, route.mode, "compared")
        for image in measures:
            tally.images += 1
            for name, value in image.items():
                tally.sums[name] += value
            self.metrics.agreement_of(model, route.candidate, image)

    def _dropped(self, model: str, route: Route, tally: Tally, reason: str) -> None:
        """Count a comparison that did not happen: "busy", "queue" (outcome dropped_<reason>) or "failed"."""
        assert route.candidate is not None and route.mode is not None
        tally.dropped[reason] += 1
        outcome = "failed" if reason == "failed" else f"dropped_{reason}"
        self.metrics.candidate_request(model, route.candidate, route.mode, outcome)

    @property
    def _yields(self) -> bool:
        """Whether comparisons give way to users (`shadow_max_utilisation` below 1)."""
        return self.settings.shadow_max_utilisation < 1.0

    def _too_busy(self) -> bool:
        return self._yields and self._utilisation() > self.settings.shadow_max_utilisation

    async def _idle(self) -> bool:
        """Wait (at most `IDLE_WAIT_S`) until no request is in flight; False if that moment did not come."""
        loop = asyncio.get_running_loop()
        until = loop.time() + IDLE_WAIT_S
        while self._busy() > 0:
            if loop.time() >= until:
                return False
            await asyncio.sleep(IDLE_POLL_S)
        return True

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the comparisons running now (tests and shutdown)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)

    def _tally(self, model: str, version: str, mode: Mode) -> Tally:
        tally = self.tallies.get(model)
        if tally is None or tally.version != version or tally.mode != mode:
            tally = self.tallies[model] = Tally(version, mode)
        return tally

    # ---- changes (under the model's lock, each logged with who asked) ----

    def _model(self, model: str) -> VersionState:
        state = self.states.get(model)
        if state is None:
            raise LifecycleError(404, "model_not_found", f"model {model} is not served here")
        return state

    async def _ensure_loaded(self, model: str, version: str) -> None:
        if version in self.backend.loaded_versions(model):
            return
        try:
            await self.backend.load_version(model, version)
        except VersionRefused as error:
            self.refused[model, version] = str(error)
            raise LifecycleError(422, "version_refused", str(error)) from error
        self.refused.pop((model, version), None)

    def _swap(self, model: str, state: VersionState, action: str, who: str) -> None:
        before = self.states[model]
        self.states[model] = state  # the one reference swap: requests that start now see the new state
        self.metrics.current(model, state.current)
        self.metrics.change(model, action)
        log.warning(
            "lifecycle %s %s by %s: current %s -> %s, previous %s, candidate %s",
            action, model, who, before.current, state.current, state.previous,
            asdict(state.candidate) if state.candidate else None,
        )  # fmt: skip

    async def load(self, model: str, version: str | None, who: str, activate: bool = True) -> dict[str, Any]:
        """Load `version` (default: the repository's highest), warmed up and checked; with `activate`, make it
        current (the current one becomes previous). 422 with the reason if it fails; nothing changes then."""
        self._model(model)
        async with self._locks[model]:
            version = version or self._newest(model)
            try:
                await self._ensure_loaded(model, version)
            except LifecycleError as error:
                self.metrics.change(model, "load_refused")
                log.warning("lifecycle load %s v%s by %s refused: %s", model, version, who, error.message)
                raise
            state = self.states[model]
            if activate and version != state.current:
                candidate = state.candidate if state.candidate and state.candidate.version != version else None
                self._swap(model, VersionState(version, state.current, candidate), "load", who)
            else:
                log.warning("lifecycle load %s v%s by %s (loaded, not made current)", model, version, who)
        return self.describe(model)

    async def rollback(self, model: str, who: str) -> dict[str, Any]:
        """Make the previous version current again (it is still loaded: instant); 409 if there is none."""
        self._model(model)
        async with self._locks[model]:
            state = self.states[model]
            if state.previous is None or state.previous not in self.loaded(model):
                raise LifecycleError(409, "no_previous_version", f"model {model} has no previous version loaded")
            self._swap(model, VersionState(state.previous, state.current, state.candidate), "rollback", who)
        return self.describe(model)

    async def unload(self, model: str, version: str, who: str) -> dict[str, Any]:
        """Unload a version that is neither current nor the candidate (409 otherwise)."""
        self._model(model)
        async with self._locks[model]:
            state = self.states[model]
            if version == state.current:
                raise LifecycleError(409, "version_in_use", f"v{version} is {model}'s current version")
            if state.candidate is not None and version == state.candidate.version:
                raise LifecycleError(409, "version_in_use", f"v{version} is {model}'s candidate: clear it first")
            if version not in self.backend.loaded_versions(model):
                raise LifecycleError(404, "version_not_found", f"model {model} has no version {version} loaded")
            previous = None if state.previous == version else state.previous
            self.states[model] = replace(state, previous=previous)
            await self._unused(model, version)  # requests routed to it before the swap finish on it
            await self.backend.unload_version(model, version)
            self.metrics.change(model, "unload")
            log.warning("lifecycle unload %s v%s by %s", model, version, who)
        return self.describe(model)

    async def set_candidate(self, model: str, version: str, mode: Mode, share: float, who: str) -> dict[str, Any]:
        """Make `version` (loaded now if it is not) the candidate in `mode` for `share` of the traffic."""
        self._model(model)
        if not 0.0 <= share <= 1.0:
            raise LifecycleError(422, "invalid_request", f"share must be within 0..1, got {share}")
        async with self._locks[model]:
            if version == self.states[model].current:
                raise LifecycleError(409, "version_in_use", f"v{version} is {model}'s current version already")
            await self._ensure_loaded(model, version)
            state = self.states[model]
            self._swap(model, replace(state, candidate=Candidate(version, mode, share)), "candidate", who)
            self._tally(model, version, mode)
        return self.describe(model)

    async def clear_candidate(self, model: str, who: str) -> dict[str, Any]:
        self._model(model)
        async with self._locks[model]:
            self._swap(model, replace(self.states[model], candidate=None), "candidate_cleared", who)
        return self.describe(model)

    async def promote(self, model: str, who: str) -> dict[str, Any]:
        """Make the candidate current (the current one becomes previous); 409 without a candidate."""
        self._model(model)
        async with self._locks[model]:
            state = self.states[model]
            if state.candidate is None:
                raise LifecycleError(409, "no_candidate", f"model {model} has no candidate")
            self._swap(model, VersionState(state.candidate.version, state.current, None), "promote", who)
        return self.describe(model)

    # ---- what the admin surface and /models show ----

    def _newest(self, model: str) -> str:
        versions = repository_versions(self.settings.model_repository, model)
        if not versions:
            raise LifecycleError(404, "version_not_found", f"{model} has no version in the repository")
        return versions[-1]

    def describe(self, model: str) -> dict[str, Any]:
        state = self._model(model)
        return {
            "name": model,
            "current": state.current,
            "previous": state.previous,
            "candidate": asdict(state.candidate) if state.candidate else None,
            "loaded": self.loaded(model),
        }

    def summary(self, model: str) -> dict[str, Any]:
        """The model's candidate and how it agrees with the current version so far (this replica)."""
        described = self.describe(model)
        tally = self.tallies.get(model)
        task = self.contracts[model].task
        return {
            **described,
            "task": task,
            "measures": list(MEASURES.get(task, ())),
            "comparison": tally.report() if tally is not None else None,
        }

    def index(self) -> list[dict[str, Any]]:
        """Every version in the repository and loaded, as Triton's repository index lists them."""
        rows = []
        for model in self.states:
            on_disk = repository_versions(self.settings.model_repository, model)
            loaded = set(self.loaded(model))
            for version in sorted(set(on_disk) | loaded, key=int):
                state = "READY" if version in loaded else "UNAVAILABLE"
                reason = self.refused.get((model, version), "" if version in loaded else "not loaded")
                rows.append({"name": model, "version": version, "state": state, "reason": reason})
        return rows

    def close(self) -> None:
        for task in list(self._pending):
            task.cancel()


class RepositoryWatcher:
    """Polls the repository every `interval_s`; a new highest version directory of a served model, once it
    has stopped changing (two polls alike), is loaded and made current. A refused one is not tried again
    until its files change."""

    def __init__(self, versions: ModelVersions, repository: Path, interval_s: float) -> None:
        self.versions = versions
        self.repository = repository
        self.interval_s = interval_s
        self._seen: dict[tuple[str, str], tuple[float, ...]] = {}  # (model, version) → file mtimes last poll
        self._tried: dict[tuple[str, str], tuple[float, ...]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive one bad poll
                log.exception("repository poll failed")

    def _stamp(self, model: str, version: str) -> tuple[float, ...]:
        folder = self.repository / model / version
        return tuple(sorted((p.name, p.stat().st_mtime, p.stat().st_size) for p in folder.iterdir() if p.is_file()))  # type: ignore[misc]

    async def poll(self) -> None:
        """One look at the repository (what the task does every `interval_s`)."""
        for model, state in list(self.versions.states.items()):
            versions = repository_versions(self.repository, model)
            if not versions or int(versions[-1]) <= int(state.current):
                continue
            newest = versions[-1]
            key = (model, newest)
            try:
                stamp = self._stamp(model, newest)
            except OSError:
                continue
            stable = self._seen.get(key) == stamp and bool(stamp)
            self._seen[key] = stamp
            if not stable or self._tried.get(key) == stamp:
                continue
            self._tried[key] = stamp
            try:
                await self.versions.load(model, newest, who="repository watcher")
            except ApiError as error:
                log.error("repository watcher: %s v%s refused, %s keeps serving: %s", model, newest, state.current, error.message)
