"""`python -m service` as users start it, in both ingress modes: it listens on loopback only (issue
18, network surface), and answers as the default path does.

Each gateway runs as users start it (its own local Ray, free ports); every socket of its whole
process tree (Ray's GCS, raylet, workers, agents, Serve's proxy and replicas, HAProxy) is read
with psutil. A socket off loopback passes only if it refuses a call without Ray's token, checked
through loopback; nothing is ever sent to a network address. The same two gateways (HAProxy sends
requests straight to the gateway replica's own HTTP server; Serve's Python proxy) must give the
answers and error answers of the session's gateway, which the rest of the suite tests.
"""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from stack.__main__ import Gateway
from support.ports import free_port, reserved_free_port, reserved_free_ports
from support.process import spawn
from support.waiting import wait_for
from tests.conftest import ROOT
from tests.security.listeners import Listener, listeners, rejects_unauthenticated_grpc, session_members
from training.shapes import make_scene

# Serve drains a direct-ingress replica for 30 s before it exits (haproxy mode).
STOP_TIMEOUT_S = 90
MODELS = "classifier,detector"  # /segment is disabled


def users_environment() -> dict[str, str]:
    """This environment without the suite's CVSERVE_* and RAY_* settings, as a user's shell has it."""
    return {name: value for name, value in os.environ.items() if not name.startswith(("CVSERVE_", "RAY_"))}


def png(seed: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, size, 1, 3).image).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class RunningGateway:
    gateway: Gateway
    ingress: str
    ports: dict[str, int]
    listeners: list[Listener] = field(default_factory=list)  # read once the gateway answers

    @property
    def leader(self) -> psutil.Process:
        return psutil.Process(self.gateway.process.pid)

    @property
    def ray_environment(self) -> dict[str, str]:
        """The environment the gateway gave Ray's processes (its own /proc environ predates `os.environ.update`)."""
        for child in self.leader.children(recursive=True):
            environment = child.environ()
            if "RAY_AUTH_TOKEN_PATH" in environment:
                return environment
        raise AssertionError("no Ray process of the gateway has RAY_AUTH_TOKEN_PATH")

    @property
    def private_dir(self) -> Path:
        return Path(self.ray_environment["RAY_AUTH_TOKEN_PATH"]).parent


INGRESSES = ("proxy", "haproxy")


def _spawn(ingress: str, model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningGateway:
    # All from the reserved range: the two gateways start side by side, and a port the OS picked now
    # (ephemeral) can be taken by the other gateway's Ray processes before this one binds it.
    port, ray_metrics_port, stats_port, metrics_port, fallback_port = reserved_free_ports(5)
    ports = {
        "CVSERVE_PORT": port,
        "CVSERVE_RAY_METRICS_PORT": ray_metrics_port,
        "CVSERVE_HAPROXY_STATS_PORT": stats_port,
        "CVSERVE_HAPROXY_METRICS_PORT": metrics_port,
    }
    env = {
        **users_environment(),
        **{name: str(port) for name, port in ports.items()},
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": "local",  # its own Ray, not the test session's
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_port),  # haproxy mode's fallback proxy, else 8500
        "CVSERVE_INGRESS": ingress,
        "CVSERVE_MODELS": MODELS,
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_DEVICE": "cpu",
    }
    log_path = tmp_path_factory.mktemp(f"gateway-{ingress}") / "gateway.log"
    process = spawn([sys.executable, "-m", "service"], log_path, cwd=ROOT, env=env)
    gateway = Gateway(process=process, log_path=log_path, port=ports["CVSERVE_PORT"])
    return RunningGateway(gateway, ingress, ports)


def _wait_listening(running: RunningGateway) -> None:
    running.gateway.wait_ready(240)
    pid, port = running.gateway.process.pid, running.ports["CVSERVE_PORT"]

    def client_port_seen() -> bool:  # HAProxy restarts itself on each route change at start-up
        running.listeners = listeners(pid)
        return any(listener.port == port for listener in running.listeners)

    wait_for(client_port_seen, 60, f"nothing in the {running.ingress} gateway's tree listens on {port}")


def _stop(running: RunningGateway, private_dir: Path | None) -> list[str]:
    """Stop one gateway; what went wrong in its shutdown."""
    process = running.gateway.process
    # SIGTERM to the gateway (it shuts Serve and Ray down), then SIGKILL its group
    running.gateway.stop(STOP_TIMEOUT_S)
    for straggler in session_members(process.pid):  # Ray's workers lead process groups of their own
        straggler.kill()
    problems = []
    if process.returncode != 0:
        problems.append(f"the {running.ingress} gateway did not stop cleanly:\n{running.gateway.log_tail()}")
    if private_dir is not None and private_dir.exists():
        problems.append(
            f"the {running.ingress} gateway's private directory (Ray's token, HAProxy's socket) outlived it"
        )
    return problems


@pytest.fixture(scope="module")
def gateways(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningGateway]]:
    """One gateway per ingress mode, started side by side and stopped side by side: one starting alone
    leaves about half of this machine's two cores idle (Ray's processes mostly wait on each other)."""
    started: dict[str, RunningGateway] = {}
    private_dirs: dict[str, Path] = {}
    try:
        for ingress in INGRESSES:
            started[ingress] = _spawn(ingress, model_repository, tmp_path_factory)
        for ingress, running in started.items():
            _wait_listening(running)
            private_dirs[ingress] = running.private_dir
        yield started
    finally:
        with ThreadPoolExecutor(len(started) or 1) as pool:
            stopped = list(pool.map(lambda r: _stop(r, private_dirs.get(r.ingress)), started.values()))
    problems = [problem for found in stopped for problem in found]
    assert not problems, "\n".join(problems)


@pytest.fixture(params=INGRESSES)
def running(request: pytest.FixtureRequest, gateways: dict[str, RunningGateway]) -> RunningGateway:
    return gateways[request.param]


def _report(found: list[Listener]) -> str:
    return "\n".join(f"  {listener}" for listener in found)


def test_every_listener_is_on_loopback_or_needs_rays_token(running: RunningGateway) -> None:
    found = running.listeners
    off_loopback = [listener for listener in found if not listener.on_loopback]
    unprotected = [listener for listener in off_loopback if not rejects_unauthenticated_grpc(listener)]
    assert not unprotected, (
        f"listening off loopback without Ray's token ({running.ingress} ingress):\n{_report(unprotected)}"
        f"\nall listeners:\n{_report(found)}"
    )
    # What may sit off loopback at all: Serve's replica gRPC server, one per replica process.
    for listener in off_loopback:
        assert listener.command.startswith("ray::ServeReplica:"), listener
    assert len({listener.pid for listener in off_loopback}) == len(off_loopback), _report(off_loopback)


def test_the_published_ports_are_on_loopback(running: RunningGateway) -> None:
    found = running.listeners
    names = ["CVSERVE_PORT", "CVSERVE_RAY_METRICS_PORT"]
    if running.ingress == "haproxy":
        names += ["CVSERVE_HAPROXY_STATS_PORT", "CVSERVE_HAPROXY_METRICS_PORT"]
    for name in names:
        port = running.ports[name]
        on_port = [listener for listener in found if listener.port == port and listener.kind == "tcp"]
        assert on_port and all(listener.on_loopback for listener in on_port), (
            f"{name}={port}:\n{_report(found)}"
        )
    if running.ingress == "haproxy":
        served_by = {
            listener.command.split()[0]
            for listener in found
            if listener.port == running.ports["CVSERVE_PORT"]
        }
        assert all(path.endswith("/haproxy") for path in served_by), served_by


def test_rays_token_and_haproxys_files_are_private(running: RunningGateway) -> None:
    leader = running.leader
    assert running.ray_environment["RAY_AUTH_MODE"] == "token"
    private_dir = running.private_dir
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    token = private_dir / "ray_auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    if running.ingress != "haproxy":
        return
    haproxies = [
        p for p in leader.children(recursive=True) if p.cmdline()[:1] and p.cmdline()[0].endswith("/haproxy")
    ]
    assert haproxies, "no HAProxy in the gateway's process tree"
    for haproxy in haproxies:
        command = haproxy.cmdline()
        config = Path(command[command.index("-f") + 1])
        assert config.is_relative_to(private_dir), command

        def hardened(config: Path = config) -> str | None:
            text = config.read_text()
            return text if re.search(rf"stats socket {re.escape(str(private_dir))}/\S+ mode 600 ", text) else None

        # Ray rewrites the config when routes change and then starts HAProxy through the launcher, which
        # hardens it before HAProxy reads it: a read in between sees Ray's own text for a moment.
        text = wait_for(hardened, 15, lambda config=config: config.read_text())
        assert "timeout client 3600s" not in text and "timeout client 35s" in text
        assert "timeout http-request 10s" in text
        assert f"log {private_dir}/log.sock " in text  # not UDP: no datagram socket on every interface
    sockets = list(private_dir.glob("*/admin.sock"))
    assert sockets and all(stat.S_IMODE(sock.stat().st_mode) == 0o600 for sock in sockets), sockets  # as HAProxy made it
    stderr = "".join(
        path.read_text(errors="replace") for path in private_dir.glob("*/admin.sock.*.stderr.log")
    )
    assert "[ALERT]" not in stderr, stderr


def test_a_network_address_without_an_api_key_refuses_to_start(model_repository: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CVSERVE_HOST": "0.0.0.0",
        "CVSERVE_PORT": str(free_port()),
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
    }
    env.pop("CVSERVE_API_KEY", None)
    env.pop("CVSERVE_ALLOW_ANONYMOUS", None)
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "CVSERVE_API_KEY" in done.stderr and "CVSERVE_ALLOW_ANONYMOUS" in done.stderr, done.stderr
    assert "Started a local Ray" not in done.stderr, "Ray must not start for a refused configuration"


@pytest.mark.parametrize("endpoint", ["/classify", "/detect"])
def test_each_ingress_gives_the_default_paths_answers(
    running: RunningGateway, embedded_gateway: str, endpoint: str
) -> None:
    files = [("files", (f"{i}.png", png(4242 + i, 200), "image/png")) for i in range(4)]
    served = httpx.post(running.gateway.url + endpoint, files=files, timeout=60)
    default = httpx.post(embedded_gateway + endpoint, files=files, timeout=60)
    assert served.status_code == default.status_code == 200, (served.text, default.text)
    served_results, default_results = served.json()["results"], default.json()["results"]
    assert len(served_results) == 4
    if endpoint == "/classify":
        for a, b in zip(served_results, default_results, strict=True):
            assert b["predictions"], "no predictions: nothing to compare"
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            assert [p["score"] for p in a["predictions"]] == pytest.approx(
                [p["score"] for p in b["predictions"]], abs=1e-4
            )
    else:
        for i, (a, b) in enumerate(zip(served_results, default_results, strict=True)):
            assert b["detections"], f"image {i}: no detections on a scene of shapes, nothing to compare"
            assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
            for da, db in zip(a["detections"], b["detections"], strict=True):
                assert da["box"] == pytest.approx(db["box"], abs=0.5)


def test_each_ingress_keeps_the_error_contract(running: RunningGateway) -> None:
    url, image = running.gateway.url, {"Content-Type": "image/png"}
    bad = httpx.post(url + "/classify", content=b"not an image", headers=image, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "undecodable_image", bad.text
    wrong_type = httpx.post(url + "/classify", content=b"x", headers={"Content-Type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415 and wrong_type.json()["error"]["code"] == "unsupported_media_type"
    disabled = httpx.post(url + "/segment", content=png(1, 64), headers=image, timeout=30)
    assert disabled.status_code == 404 and disabled.json()["error"]["code"] == "model_disabled"
    ok = httpx.post(url + "/classify", content=png(7, 64), headers=image, timeout=30)
    assert ok.status_code == 200, ok.text


def test_haproxy_ports_in_use_are_refused_up_front(model_repository: Path) -> None:
    """A gateway whose HAProxy stats port is taken exits at once with a clear message (no Ray started)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stats_port = taken.getsockname()[1]
        env = {
            **users_environment(),
            "PYTHONPATH": str(ROOT),
            "CVSERVE_INGRESS": "haproxy",
            "CVSERVE_MODEL_REPOSITORY": str(model_repository),
            "CVSERVE_PORT": str(free_port()),
            "CVSERVE_RAY_METRICS_PORT": str(free_port()),
            "CVSERVE_HAPROXY_STATS_PORT": str(stats_port),
            "CVSERVE_HAPROXY_METRICS_PORT": str(reserved_free_port()),  # not 9101: a running gateway has it
        }
        done = subprocess.run(
            [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode != 0
    assert f"port {stats_port} is in use" in done.stderr and "CVSERVE_HAPROXY_STATS_PORT" in done.stderr, done.stderr
    assert "Started a local Ray" not in done.stderr, "Ray must not start for a refused configuration"
