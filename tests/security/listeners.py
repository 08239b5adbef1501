"""Every socket a process tree listens on, and whether each is reachable from this machine only.

Sockets are read with psutil, never probed on a network address: the one check that sends
anything (`rejects_unauthenticated_grpc`) talks to a wildcard listener through loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

import grpc
import psutil

# The gRPC server Ray Serve starts in every replica on [::]:0 (ray/serve/_private/replica.py);
# its only protection off loopback is Ray's token interceptor.
SERVE_REPLICA_METHOD = "/ray.serve.ASGIService/HandleRequest"


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket, or one bound UDP socket that accepts datagrams from anyone."""

    kind: str  # "tcp" or "udp"
    address: str
    port: int
    pid: int
    command: str

    @property
    def on_loopback(self) -> bool:
        address = ipaddress.ip_address(self.address.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
        return (mapped or address).is_loopback

    @property
    def on_every_interface(self) -> bool:
        return self.address in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"{self.kind} {self.address}:{self.port}  pid {self.pid}  {self.command}"


def session_members(session_id: int) -> list[psutil.Process]:
    """Every process in the session `session_id` (a server started with start_new_session leads one)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                members.append(process)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def process_tree(leader_pid: int) -> list[psutil.Process]:
    """The leader, its descendants, and anything else in its session (re-parented daemons too)."""
    leader = psutil.Process(leader_pid)
    tree = {leader.pid: leader, **{child.pid: child for child in leader.children(recursive=True)}}
    for process in session_members(leader_pid):
        tree.setdefault(process.pid, process)
    return list(tree.values())


def listeners(leader_pid: int) -> list[Listener]:
    """Every LISTEN TCP socket and every bound, unconnected UDP socket of the process tree."""
    found = set()
    for process in process_tree(leader_pid):
        try:
            connections = process.net_connections(kind="inet")
            command = " ".join(process.cmdline())[:160] or _executable(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for connection in connections:
            tcp = connection.status == psutil.CONN_LISTEN
            udp = (
                connection.type == socket.SOCK_DGRAM
                and connection.status == psutil.CONN_NONE
                and not connection.raddr
            )
            if tcp or udp:
                kind = "tcp" if tcp else "udp"
                found.add(Listener(kind, connection.laddr.ip, connection.laddr.port, process.pid, command))
    return sorted(found, key=lambda listener: (listener.address, listener.port, listener.pid))


def _executable(process: psutil.Process) -> str:
    """The program of a process whose command line reads empty (one exiting, or between fork and exec: a
    suite run met one holding the gateway's port): its executable's path, else its name."""
    try:
        return process.exe() or process.name()
    except psutil.AccessDenied:
        return process.name()


def rejects_unauthenticated_grpc(listener: Listener, method: str = SERVE_REPLICA_METHOD) -> bool:
    """Whether a call without Ray's token, sent through loopback, is refused as UNAUTHENTICATED.

    Only a wildcard listener can be reached this way; one on a specific network address cannot be
    checked without sending traffic there, so it counts as unprotected.
    """
    if not listener.on_every_interface or listener.kind != "tcp":
        return False
    target = f"[::1]:{listener.port}" if listener.address == "::" else f"127.0.0.1:{listener.port}"
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        try:
            call(b"", timeout=10)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
    return False
