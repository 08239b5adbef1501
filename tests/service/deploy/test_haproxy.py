"""service/deploy/haproxy.py against the config that the installed Ray Serve really writes.

The config comes from Ray's own generator (a private API, on purpose: when an upgrade changes the
template, these tests say whether the launcher still catches every monitoring bind), and the real
HAProxy binary checks the rewritten file with `-c`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service.deploy import haproxy as haproxy_launcher

MONITOR_PORTS = (8404, 9101)


def ray_written_config(directory: Path, host: str) -> Path:
    """The HAProxy config Ray Serve generates for an HTTP frontend on `host`:8000."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    config = HAProxyConfig(
        http_options=HTTPOptions(host=host, port=8000),
        stats_port=MONITOR_PORTS[0],
        metrics_port=MONITOR_PORTS[1],
        socket_path=str(directory / "admin.sock"),
        server_state_base=str(directory),
        server_state_file=str(directory / "server-state"),
    )
    api = HAProxyApi(cfg=config, config_file_path=str(directory / "haproxy.cfg"))
    api._generate_config_file_internal()
    return Path(api.config_file_path)


def binds(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]


@pytest.mark.parametrize("frontend_host", ["127.0.0.1", "0.0.0.0"])
def test_monitor_ports_move_to_loopback_and_the_client_port_stays(tmp_path: Path, frontend_host: str) -> None:
    original = ray_written_config(tmp_path, frontend_host).read_text()
    assert {"*:8404", ":9101"} <= set(binds(original))  # what Ray writes: every interface

    hardened = haproxy_launcher.harden_config(original, "127.0.0.1", 10)

    client = "*:8000" if frontend_host == "0.0.0.0" else "127.0.0.1:8000"
    assert sorted(binds(hardened)) == sorted([client, "127.0.0.1:8404", "127.0.0.1:9101"])
    assert "mode 600 level admin" in hardened and "mode 666" not in hardened
    assert "    timeout http-request 10s" in hardened.splitlines()
    assert haproxy_launcher.harden_config(hardened, "127.0.0.1", 10) == hardened  # a reload rewrites nothing


def test_an_ipv6_monitor_host_is_bracketed(tmp_path: Path) -> None:
    hardened = haproxy_launcher.harden_config(
        ray_written_config(tmp_path, "127.0.0.1").read_text(), "::1", 10
    )
    assert {"[::1]:8404", "[::1]:9101"} <= set(binds(hardened))


def test_haproxy_accepts_the_hardened_config(tmp_path: Path) -> None:
    path = ray_written_config(tmp_path, "127.0.0.1")
    haproxy_launcher.rewrite_in_place(str(path), "127.0.0.1", 10)
    haproxy = haproxy_launcher.find_haproxy()
    check = subprocess.run(
        [haproxy, "-c", "-f", str(path)], check=False, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_launcher_rewrites_then_becomes_haproxy_with_rays_arguments(tmp_path: Path) -> None:
    """What Ray runs: `<launcher> -db -f <config> -sf <old pid>`, with the pid kept across exec."""
    config = ray_written_config(tmp_path, "127.0.0.1")
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f'#!/bin/sh\necho "$$ $*"\ngrep -c "bind 127.0.0.1:8404" {config}\n')
    fake.chmod(stat.S_IRWXU)
    launcher = [sys.executable, "-I", haproxy_launcher.__file__, "--haproxy", str(fake), "--monitor-host"]
    command = [
        *launcher,
        "127.0.0.1",
        "--http-request-timeout",
        "10",
        "--",
        "-db",
        "-f",
        str(config),
        "-sf",
        "42",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    pid, args = out.splitlines()[0].split(" ", 1)
    assert int(pid) == process.pid and args == f"-db -f {config} -sf 42"
    assert out.splitlines()[1] == "1"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
