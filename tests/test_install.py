"""scripts/install.py (`make setup`): uv is told pip's settings, and resolves what pip resolves."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("install", ROOT / "scripts" / "install.py")
assert spec is not None and spec.loader is not None
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

LISTING = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
:env:.default-timeout='180'
:env:.find-links='/srv/wheels'
install.index-url='https://mirror.example/simple'
"""


def test_pip_settings_are_read_with_the_environment_winning() -> None:
    config = install.parse_pip_config(LISTING)
    assert config == {
        "cert": "/etc/ssl/certs/ca-certificates.crt",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple",
        "find-links": "/srv/wheels",  # PIP_FIND_LINKS over the file's
        "default-timeout": "180",
        "index-url": "https://mirror.example/simple",
    }


def test_uv_gets_every_index_constraint_and_the_ca_bundle() -> None:
    command, env = install.uv_command(install.parse_pip_config(LISTING))
    pairs = list(zip(command, command[1:], strict=False))
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/srv/wheels") in pairs and ("--find-links", "/opt/wheels") not in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert ("--index-url", "https://mirror.example/simple") in pairs
    assert ("--index-strategy", "unsafe-best-match") in pairs  # every index for every package, as pip
    assert ("--python", sys.executable) in pairs and "--compile-bytecode" in command  # as pip compiles
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt" and env["UV_HTTP_TIMEOUT"] == "180"


def test_uv_resolves_exactly_what_pip_resolves(tmp_path: Path) -> None:
    """uv with this machine's pip settings resolves, afresh, every package pip resolves for the project
    at the same version. Both resolve now, from the same indexes: comparing with the versions installed
    would fail whenever an index gains a release after the environment was built (idna 3.21 did, on
    2026-12-05, under an environment installed that morning)."""
    uv = Path(sys.executable).with_name("uv")
    if not uv.is_file():
        pytest.skip("this environment was installed by pip (uv could not be installed)")
    options, env = install.uv_options(install.pip_config())
    done = subprocess.run(
        [str(uv), "pip", "compile", "--python", sys.executable, *options,
         "pyproject.toml", "--extra", "dev", "--no-header", "--no-annotate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = dict(line.split("==") for line in done.stdout.split() if "==" in line)
    report = tmp_path / "pip-resolution.json"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), ".[dev]"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    by_pip = {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
        if canonical(item["metadata"]["name"]) not in NOT_RESOLVED
    }
    assert len(by_pip) > 150
    assert {canonical(n): v for n, v in resolved.items() if canonical(n) not in NOT_RESOLVED} == by_pip


# The project itself, the installers, and setuptools, which `python -m venv` seeds (3.11) at its own version.
NOT_RESOLVED = {"cvserve", "pip", "uv", "setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
