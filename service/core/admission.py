"""Admission control of one gateway replica: requests, bytes, pixels and model passes in flight, each bounded.

A model pass is one image through the model: a request counts one per image, an explained one as many
as its explanation runs (`service.core.explain`: images x (grid^2 + 1) for occlusion).

A request is admitted after its body has been read (so a slow upload holds no slot) and holds its
share until every thread working on its images has finished, even when the request itself gave up
at its deadline: the budget bounds the work running, not only the requests waiting for it.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from service.core.errors import ApiError


@dataclass(frozen=True)
class Limits:
    requests: int
    bytes: int
    pixels: int
    passes: int = 2**62  # model passes (unbounded unless given)


# The time constant of `Admission.utilisation`: about the last second counts.
UTILISATION_TAU_S = 1.0


class Admission:
    """Counts what admitted requests hold; refuses a new one (503 + Retry-After) past any limit."""

    def __init__(self, limits: Limits, retry_after_s: int) -> None:
        self.limits = limits
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()  # tickets are released from worker threads too
        self.requests = self.bytes = self.pixels = self.passes = 0
        self._share = 0.0  # the recent share of time with a request in flight (see utilisation)
        self._since = time.monotonic()  # when _share was last brought up to date

    def utilisation(self) -> float:
        """The share of the recent time (exponentially weighted, `UTILISATION_TAU_S`) during which at least
        one request was in flight: 0 for an idle gateway, near 1 for one that is never without work."""
        with self._lock:
            self._account(time.monotonic())
            return self._share

    def _account(self, now: float) -> None:
        """Fold the time since the last look into `_share` (under the lock, before `requests` changes)."""
        elapsed = now - self._since
        if elapsed > 0:
            decay = math.exp(-elapsed / UTILISATION_TAU_S)
            self._share = self._share * decay + (1.0 - decay) * (1.0 if self.requests else 0.0)
            self._since = now

    def admit(self, nbytes: int, pixels: int, passes: int = 0) -> Ticket:
        """A ticket for a request of `nbytes`, `pixels` and `passes` model passes, or ApiError 503 if it does
        not fit now."""
        with self._lock:
            if self.requests:  # a request alone always fits: the per-request limits bound it
                wanted = (
                    ("requests", self.requests + 1, self.limits.requests),
                    ("bytes", self.bytes + nbytes, self.limits.bytes),
                    ("pixels", self.pixels + pixels, self.limits.pixels),
                    ("model passes", self.passes + passes, self.limits.passes),
                )
                full = next((name for name, total, limit in wanted if total > limit), None)
                if full is not None:
                    raise ApiError(
                        503,
                        "overloaded",
                        f"the gateway is at its limit of {full} in flight; retry after {self._retry_after_s} s",
                        headers={"Retry-After": str(self._retry_after_s)},
                    )
            self._account(time.monotonic())
            self.requests += 1
            self.bytes += nbytes
            self.pixels += pixels
            self.passes += passes
        return Ticket(self, nbytes, pixels, passes)

    def _release(self, nbytes: int, pixels: int, passes: int = 0) -> None:
        with self._lock:
            self._account(time.monotonic())
            self.requests -= 1
            self.bytes -= nbytes
            self.pixels -= pixels
            self.passes -= passes


class Ticket:
    """One admitted request's share; given back once the request and all its held work are done."""

    def __init__(self, admission: Admission, nbytes: int, pixels: int, passes: int = 0) -> None:
        self._admission = admission
        self._nbytes, self._pixels, self._passes = nbytes, pixels, passes
        self._lock = threading.Lock()
        self._holds = 1  # the request itself
        self._released = False

    def hold(self, work: Future[object]) -> None:
        """Keep the share until `work` (a thread-pool future for this request) has finished."""
        with self._lock:
            self._holds += 1
        work.add_done_callback(lambda _: self._drop())

    def release(self) -> None:
        """The request is answered (or gave up); the share goes back once held work is done too."""
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            self._holds -= 1
            done = self._holds == 0 and not self._released
            if done:
                self._released = True
        if done:
            self._admission._release(self._nbytes, self._pixels, self._passes)
