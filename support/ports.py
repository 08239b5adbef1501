"""Loopback ports for the servers the harness starts."""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack

# Neither the OS (ephemeral ports) nor Ray (workers 10002-19999, Serve's direct ingress 30000-31000)
# hands out ports here on its own, so one picked now is still free when a server binds it later.
RESERVED_RANGE = range(20000, 30000)


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nobody listens on right now (all held open together while picking)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    (port,) = free_ports(1)
    return port


def reserved_free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports from `RESERVED_RANGE` (all held open together while picking):
    chosen now, they are still free when HAProxy binds them later."""
    with ExitStack() as stack:
        ports: list[int] = []
        for port in random.Random().sample(RESERVED_RANGE, 200 + count):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"not {count} free ports in {RESERVED_RANGE.start}-{RESERVED_RANGE.stop - 1}")


def reserved_free_port() -> int:
    """A free loopback port from `RESERVED_RANGE` (see `reserved_free_ports`)."""
    (port,) = reserved_free_ports(1)
    return port
