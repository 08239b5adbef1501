"""Slow and vanishing clients against a small admission limit.

The gateway's API (`create_api` over the real TorchScript classifier) runs here under a real
uvicorn server, admitting one request at a time. A slow upload holds no admission slot while its
body trickles in and is cut off with 408 at `body_timeout_s`; a client that goes away mid-body is
recorded as 499, never 500; and behind the session's HAProxy ingress a client that sends its headers
slowly is cut off at HAProxy's header timeout while everyone else is served.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from service.__main__ import HAPROXY_HEADER_TIMEOUT_S
from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.serving import served_in_thread
from support.waiting import wait_for
from training.shapes import make_scene

BODY_TIMEOUT_S = 2.0
SLOW_CLIENTS = 3


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, 96, 1, 1).image).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Served:
    url: str
    api: FastAPI

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 80)


@pytest.fixture(scope="module")
def served(model_repository: Path) -> Iterator[Served]:
    """The API on a real uvicorn server in this process, one request admitted at a time."""
    settings = Settings(
        model_repository=model_repository, models=("classifier",), device="cpu",
        max_in_flight_requests=1, max_ongoing_requests=8, max_batch_size=4, body_timeout_s=BODY_TIMEOUT_S,
    )  # fmt: skip
    api = create_api(settings, LocalBackend(settings))
    with served_in_thread(api, lifespan="auto") as url:
        yield Served(url, api)


def start_request(port: int, path: str, body_length: int, host: str = "127.0.0.1") -> socket.socket:
    """A connection that has sent its headers (announcing `body_length` bytes of PNG) and nothing else."""
    sock = socket.create_connection((host, port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {body_length}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def read_status(sock: socket.socket) -> int:
    """The status code of the answer on `sock` (0 if it closed without one)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def trickle(sock: socket.socket, body: bytes, until: float) -> int:
    """Send `body` one byte every 0.2 s until time `until` (or it is refused); return the status."""
    try:
        for byte in body:
            if time.monotonic() >= until:
                break
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
        return read_status(sock)
    except OSError:  # the server cut the connection while we were still sending
        return read_status(sock) if sock.fileno() != -1 else 0
    finally:
        sock.close()


def test_slow_uploads_hold_no_slot_and_are_cut_off_with_408(served: Served) -> None:
    body = png(1)
    until = time.monotonic() + BODY_TIMEOUT_S + 5
    with ThreadPoolExecutor(SLOW_CLIENTS) as pool:
        slow = [
            pool.submit(trickle, start_request(served.port, "/classify", len(body)), body, until)
            for _ in range(SLOW_CLIENTS)
        ]
        time.sleep(0.5)  # every slow upload has begun
        began = time.monotonic()
        with httpx.Client(base_url=served.url, timeout=30) as client:
            answers = [
                client.post("/classify", content=png(seed), headers={"Content-Type": "image/png"})
                for seed in range(2, 6)
            ]
        served_while_slow = time.monotonic() - began
        statuses = [future.result() for future in slow]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert served_while_slow < BODY_TIMEOUT_S, "normal requests waited for the slow uploads"
    assert statuses == [408] * SLOW_CLIENTS, statuses
    answered = served.api.state.metrics.answered
    assert answered["/classify", 408] >= SLOW_CLIENTS and answered["/classify", 500] == 0


def test_a_client_gone_mid_body_is_recorded_as_499(served: Served) -> None:
    answered = served.api.state.metrics.answered
    before = answered["/classify", 499]
    body = png(7)
    sock = start_request(served.port, "/classify", len(body))
    sock.sendall(body[: len(body) // 2])
    time.sleep(0.3)
    sock.close()
    wait_for(lambda: answered["/classify", 499] > before, 10, "the disconnect was never recorded as 499")
    assert answered["/classify", 500] == 0
    ok = httpx.post(f"{served.url}/classify", content=png(8), headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200


def test_slow_headers_are_cut_off_by_haproxy_while_others_are_served(embedded_gateway: str) -> None:
    parts = urlsplit(embedded_gateway)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=HAPROXY_HEADER_TIMEOUT_S + 10)
    sock.sendall(f"POST {parts.path}/classify HTTP/1.1\r\nHost: x\r\n".encode())
    opened = time.monotonic()
    status: list[int] = []

    def drip() -> None:  # one header line every second, never the blank line that ends them
        try:
            for i in range(3 * HAPROXY_HEADER_TIMEOUT_S):
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
                time.sleep(1.0)
        except OSError:
            pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    ok = httpx.post(f"{embedded_gateway}/classify", content=png(9), headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200
    try:
        status.append(read_status(sock))
    except OSError:
        status.append(0)
    cut_after = time.monotonic() - opened
    sock.close()
    assert status[0] in (408, 0), status  # HAProxy answers 408 (or just closes)
    assert HAPROXY_HEADER_TIMEOUT_S - 1 <= cut_after <= HAPROXY_HEADER_TIMEOUT_S + 5, cut_after
