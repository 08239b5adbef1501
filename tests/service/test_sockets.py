"""service/sockets.py: a port counts as taken while another server listens there (SO_REUSEPORT ones too, so
HTTP workers never join another server's group), and free once only TIME_WAIT connections are left."""

from __future__ import annotations

import errno
import socket
import time

from service.sockets import bind_error, listening_socket


def test_a_port_with_only_time_wait_connections_left_is_free() -> None:
    server = listening_socket("127.0.0.1", 0, reuse_port=True)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: its end waits in TIME_WAIT on the port
    time.sleep(0.1)
    client.close()
    server.close()
    time.sleep(0.1)
    with socket.socket() as plain:  # the check before: a bind without SO_REUSEADDR called this port busy
        try:
            plain.bind(("127.0.0.1", port))
            plain_free = True
        except OSError:
            plain_free = False
    assert not plain_free, "no TIME_WAIT connection was left: the test shows nothing"
    assert bind_error("127.0.0.1", port) is None


def test_a_port_another_server_listens_on_is_taken() -> None:
    for reuse_port in (False, True):  # a plain server's socket, and an HTTP worker's (SO_REUSEPORT)
        held = listening_socket("127.0.0.1", 0, reuse_port=reuse_port)
        held.listen()
        with held:
            error = bind_error("127.0.0.1", held.getsockname()[1])
        assert error is not None and error.errno == errno.EADDRINUSE, (reuse_port, error)
