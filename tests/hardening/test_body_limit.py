"""The body limit holds while the body is still arriving: a raw HTTP/1.1 client never finishes its upload.

If the gateway (or Serve's proxy) buffered the whole body before checking, these requests would get no
answer at all, since the body never ends.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

from tests.hardening.conftest import API_KEY, STRICT_MAX_BODY

CHUNK = 16 * 1024


def _connect(url: str) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    return sock, parts.path


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer (Content-Length framed, as the gateway sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed before an answer: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = sock.recv(65536)
        assert part, "connection closed inside the answer"
        body += part
    return int(status_line.split()[1]), headers, body[:length]


def _request_head(path: str, extra: str) -> bytes:
    return (
        f"POST {path}/classify HTTP/1.1\r\nHost: test\r\nX-API-Key: {API_KEY}\r\n"
        f"Content-Type: image/png\r\n{extra}\r\n"
    ).encode()


def test_chunked_upload_is_cut_off_at_the_limit(strict_gateway: str) -> None:
    """Chunks past the limit, and no final chunk: 413 arrives while the upload is still open."""
    sock, path = _connect(strict_gateway)
    with sock:
        sock.sendall(_request_head(path, "Transfer-Encoding: chunked\r\n"))
        sent = 0
        while sent <= STRICT_MAX_BODY + CHUNK:
            sock.sendall(f"{CHUNK:x}\r\n".encode() + bytes(CHUNK) + b"\r\n")
            sent += CHUNK
        status, _, body = _read_answer(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_declared_oversize_is_refused_before_any_body(strict_gateway: str) -> None:
    """A Content-Length over the limit is refused from the headers alone (no byte of body sent)."""
    sock, path = _connect(strict_gateway)
    with sock:
        sock.sendall(_request_head(path, f"Content-Length: {10 * 1024**3}\r\n"))
        status, _, body = _read_answer(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
