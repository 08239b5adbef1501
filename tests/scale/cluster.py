"""A real multi-node Ray cluster on this machine: one `ray start --block` process tree per node.

Each node runs in its own session (process group) with its own temp dir and explicit free ports, so
it never meets the test session's Ray or anyone else's; stopping a node kills exactly that session's
processes (never `ray stop`, which stops every Ray of the user).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from support import waiting
from support.ports import free_ports
from support.process import spawn

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))
T = TypeVar("T")


# What a cluster still coming up answers (refused, 5xx, half-written JSON): "not yet", not a failure.
STARTING_ERRORS = (httpx.HTTPError, OSError, ValueError, KeyError)


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
    """`support.waiting.wait_for` that takes `STARTING_ERRORS` for "not yet"; `what` is what it waits for."""
    return waiting.wait_for(condition, timeout_s, f"waiting for {what}", interval_s, retry_on=STARTING_ERRORS)


def _ray_env(token: str) -> dict[str, str]:
    """The environment for this cluster's processes: its own auth token, no inherited address."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@dataclass
class RayNode:
    """One `ray start --block` process tree (a Ray node) in its own session."""

    name: str
    temp_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def check_running(self) -> bool:
        """True while `ray start` runs; raise with its output if it exited (bad flag, port taken...)."""
        if _proc_stat(self.process.pid)[0] == "Z":  # exited, not reaped yet: its session id is still ours
            self.kill()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start for node {self.name} exited with {self.process.returncode}:\n{tail}")
        return True

    def kill(self) -> None:
        """Kill every process of this node's session at once, like a machine dying (SIGKILL).

        The session id is the `ray start` pid, which cannot be reused until we reap that process:
        so scan and kill first, reap last, and never scan again afterwards.
        """
        if self.process.returncode is not None:
            return

        def all_gone() -> bool:
            pids = _session_pids(self.process.pid)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not pids

        wait_for(all_gone, 30, f"processes of node {self.name} to exit")
        self.process.wait(timeout=30)


def _session_pids(session_id: int) -> list[int]:
    """Pids whose session id is `session_id` (the node's `ray start` started that session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _proc_stat(int(entry.name))
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3] is the session id
            pids.append(int(entry.name))
    return pids


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


@dataclass
class LocalCluster:
    """A head node plus worker nodes started with `ray start`, each with its own resources."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node (PYTHONPATH...)
    nodes: list[RayNode] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    # Token auth stays on (Ray's default); the cluster gets its own token, not the user's ~/.ray one.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self, num_cpus: float, resources: dict[str, float]) -> RayNode:
        """Start the head: GCS, dashboard (REST API for `serve deploy` and Serve status) and a raylet."""
        (self.gcs_port, self.dashboard_port, client, agent_http, agent_grpc, metrics, runtime_env, manager,
         objects) = free_ports(9)
        node = self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client}",
                *self._node_flags(num_cpus, resources, agent_http, agent_grpc, metrics, runtime_env, manager, objects),
            ],
        )
        wait_for(lambda: node.check_running() and self.alive_nodes(), 90, "the head node's dashboard")
        return node

    def add_worker(self, name: str, num_cpus: float, resources: dict[str, float]) -> RayNode:
        """Start a worker node joining the head; return once the head sees it alive."""
        agent_http, agent_grpc, metrics, runtime_env, manager, objects = free_ports(6)
        before = len(self.alive_nodes())
        node = self._start(
            name,
            [
                f"--address={self.address}",
                *self._node_flags(num_cpus, resources, agent_http, agent_grpc, metrics, runtime_env, manager, objects),
            ],
        )
        wait_for(lambda: node.check_running() and len(self.alive_nodes()) > before, 90, f"worker node {name} to join")
        return node

    @staticmethod
    def _node_flags(
        num_cpus: float, resources: dict[str, float], agent_http: int, agent_grpc: int, metrics: int,
        runtime_env: int, manager: int, objects: int,
    ) -> list[str]:
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={objects}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--object-store-memory={200 * 1024 * 1024}",
            "--disable-usage-stats",
            "--block",
        ]

    def _start(self, name: str, flags: list[str]) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.root / f"{name}.out"
        # its own session: the node's processes share it, so kill() finds them all
        process = spawn(
            [RAY, "start", f"--temp-dir={temp_dir}", *flags],
            log_path,
            cwd=self.root,
            env={**_ray_env(self.token), **self.env},
            append=False,
        )
        node = RayNode(name, temp_dir, process, log_path)
        self.nodes.append(node)
        return node

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The nodes the head's state API lists as ALIVE (node_id, resources_total, ...)."""
        response = httpx.get(
            f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, headers=self._auth, timeout=5
        )
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
        return [node for node in nodes if node["state"] == "ALIVE"]

    def serve(self, *args: str, timeout_s: float = 120) -> str:
        """Run the `serve` CLI against this cluster's dashboard; return its output."""
        result = subprocess.run(
            [SERVE, *args, f"--address={self.dashboard_url}"],
            capture_output=True,
            text=True,
            env=_ray_env(self.token),
            cwd=self.root,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"serve {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def serve_details(self) -> dict[str, Any]:
        """Serve's REST view of every application, deployment and replica (with node ids)."""
        response = httpx.get(f"{self.dashboard_url}/api/serve/applications/", headers=self._auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def shutdown(self) -> None:
        """Kill every node this cluster started, workers first."""
        for node in reversed(self.nodes):
            node.kill()
