"""Poll until something holds, instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout_s: float,
    what: str | Callable[[], str],
    interval_s: float = 0.1,
    *,
    retry_on: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `condition` until it returns something truthy and return that; TimeoutError after `timeout_s`.

    `what` says what was awaited (a callable is asked only on timeout, so it can show the last state).
    Errors in `retry_on` count as "not yet" and the last one is named in the TimeoutError; any other
    error (a server that died, a failed assertion) ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except retry_on as error:
            last_error = error
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    message = f"timed out after {timeout_s:g} s: {what() if callable(what) else what}"
    raise TimeoutError(message if last_error is None else f"{message} (last error: {last_error!r})")
