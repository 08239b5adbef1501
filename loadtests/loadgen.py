"""A small asyncio HTTP load generator: closed loop (N clients back to back) or open loop (Poisson).

Every run is bounded twice: by time and by request count. Latencies count only requests that
finish inside the measured window (after a warm-up). The open loop counts requests scheduled inside
the window and measures from each one's scheduled start, so a server that falls behind is charged
for the queue it builds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

# Builds the keyword arguments of one `httpx.AsyncClient.post` for the i-th request.
RequestBuilder = Callable[[int], dict[str, Any]]


@dataclass
class LoadResult:
    """What one load level measured (latencies in milliseconds, throughput in successful requests/s)."""

    system: str
    mode: str  # "closed" or "open"
    concurrency: int  # clients (closed loop) or the in-flight cap (open loop)
    offered_rps: float | None  # open loop only
    duration_s: float
    ok: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    error_samples: list[str] = field(default_factory=list)


class _Recorder:
    """Collects latencies of requests that finish (or, `by_start`, start) inside the window."""

    def __init__(self, window_start: float, window_end: float, by_start: bool = False) -> None:
        self.window_start = window_start
        self.window_end = window_end
        self.by_start = by_start
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []

    def record(self, started: float, finished: float, error: str | None) -> None:
        if not self.window_start <= (started if self.by_start else finished) <= self.window_end:
            return
        if error is None:
            self.latencies.append(finished - started)
            return
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(error)

    def result(self, system: str, mode: str, concurrency: int, offered_rps: float | None) -> LoadResult:
        duration = self.window_end - self.window_start
        ms = np.asarray(self.latencies) * 1000.0
        p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (float("nan"),) * 3
        return LoadResult(
            system=system,
            mode=mode,
            concurrency=concurrency,
            offered_rps=offered_rps,
            duration_s=duration,
            ok=len(ms),
            errors=self.errors,
            throughput_rps=len(ms) / duration,
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()) if len(ms) else float("nan"),
            error_samples=self.error_samples,
        )


async def _send(client: httpx.AsyncClient, url: str, request: dict[str, Any]) -> str | None:
    """POST once; return None on HTTP 200 or a short description of what went wrong."""
    try:
        response = await client.post(url, **request)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:160]}"
    return None


def _client(connections: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits)


async def closed_loop(
    system: str,
    url: str,
    build: RequestBuilder,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Run `concurrency` clients that each send their next request as soon as the last returns."""
    counter = iter(range(max_requests))
    start = time.perf_counter()
    recorder = _Recorder(start + warmup_s, start + warmup_s + duration_s)

    async with _client(concurrency, timeout_s) as client:

        async def worker() -> None:
            for index in counter:
                if time.perf_counter() >= recorder.window_end:
                    return
                began = time.perf_counter()
                error = await _send(client, url, build(index))
                recorder.record(began, time.perf_counter(), error)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    recorder.window_end = min(recorder.window_end, time.perf_counter())
    return recorder.result(system, "closed", concurrency, None)


async def open_loop(
    system: str,
    url: str,
    build: RequestBuilder,
    rate_rps: float,
    duration_s: float,
    warmup_s: float,
    max_in_flight: int,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """Send requests at Poisson arrivals of `rate_rps` (independent users), whatever the answers.

    Latency runs from each request's scheduled arrival. An arrival that finds `max_in_flight`
    requests outstanding counts as an error (the server is overloaded at this rate).
    """
    rng = random.Random(seed)
    start = time.perf_counter()
    end = start + warmup_s + duration_s
    recorder = _Recorder(start + warmup_s, end, by_start=True)
    pending: set[asyncio.Task[None]] = set()

    async with _client(max_in_flight, timeout_s) as client:

        async def one(index: int, scheduled: float) -> None:
            try:
                error = await _send(client, url, build(index))
            except asyncio.CancelledError:  # still unanswered when the run's grace period ended
                recorder.record(scheduled, time.perf_counter(), f"no answer within {timeout_s:g}s")
                raise
            recorder.record(scheduled, time.perf_counter(), error)

        arrival, index = start, 0
        while arrival < end:
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= max_in_flight:
                recorder.record(arrival, arrival, f"more than {max_in_flight} requests in flight")
            else:
                task = asyncio.create_task(one(index, arrival))
                pending.add(task)
                task.add_done_callback(pending.discard)
            index += 1
            arrival += rng.expovariate(rate_rps)
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # let them record their errors
    return recorder.result(system, "open", max_in_flight, rate_rps)
