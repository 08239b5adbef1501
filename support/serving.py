"""An ASGI app on a real uvicorn server in a thread of this process (tests that need sockets, not TestClient)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn

from support.ports import free_port
from support.waiting import wait_for


@contextmanager
def served_in_thread(
    app: Any, lifespan: Literal["auto", "on", "off"] = "on", stop_timeout_s: float = 10.0
) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a daemon thread; yield `http://127.0.0.1:<port>`;
    stop it after (waiting up to `stop_timeout_s`)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 60, "uvicorn did not start")
    assert server.started, "uvicorn exited while starting"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
