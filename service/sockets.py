"""Listening sockets: whether a server could listen on a port now, and an HTTP worker's own socket.

Both bind as servers do, with SO_REUSEADDR: the connections a stopped server left in TIME_WAIT do not keep
its port from being bound again (a check without it called a port busy for a minute after a restart, while
uvicorn, HAProxy and Serve's proxy could bind it). A socket listening there does, SO_REUSEPORT ones too.
"""

from __future__ import annotations

import socket

BACKLOG = 2048  # uvicorn's default


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 where `host` has a colon, as uvicorn binds): with `reuse_port`,
    listening and open to other SO_REUSEPORT sockets of this user (an HTTP worker's); without, only bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if reuse_port:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now (another socket listens there), or None."""
    try:
        listening_socket(host, port, reuse_port=False).close()
    except OSError as error:
        return error
    return None
