"""The wheels the GPU check carries (loadtests/gpu/wheels.txt): with the image's own packages they close
over their Requires-Dist, one version each, and stay small enough to travel."""

from __future__ import annotations

import re
import zipfile
from email.parser import Parser
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT

GPU = ROOT / "loadtests" / "gpu"
MAX_BYTES = 40 * 2**20
# The GPU image's Python (python3 3.12.3 on x86-64 Linux), for environment markers.
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
# Required by a carried wheel, deliberately not carried (see wheels.txt's header and loadtests/gpu/stubs/).
NOT_CARRIED = {"av"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, tuple[str, int]]:
    pins: dict[str, tuple[str, int]] = {}
    for line in (GPU / "wheels.txt").read_text().splitlines():
        pin, _, size = line.partition("#")
        if pin.strip():
            name, version = pin.strip().split("==")
            assert _norm(name) not in pins, f"{name} listed twice"
            pins[_norm(name)] = (version, int(size))
    return pins


def _image() -> set[str]:
    lines = (GPU / "image_packages.txt").read_text().splitlines()
    return {_norm(line) for line in lines if line.strip() and not line.startswith("#")}


def _requires(name: str, version: str) -> list[str]:
    """Requires-Dist of `name==version`: from the downloaded wheel in .whl/ if there, else from this venv."""
    wheels = [w for w in (ROOT / ".whl").glob("*.whl") if _norm(w.name.split("-")[0]) == name]
    for wheel in wheels:
        if wheel.name.split("-")[1] == version:
            with zipfile.ZipFile(wheel) as archive:
                (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
                return Parser().parsestr(archive.read(meta).decode()).get_all("Requires-Dist") or []
    installed = metadata.distribution(name)
    assert installed.version == version, (
        f"{name}: wheels.txt pins {version}, this venv has {installed.version} and .whl/ has no such wheel: "
        "update wheels.txt (and run bash loadtests/gpu/wheels.sh)"
    )
    return installed.requires or []


def test_the_list_closes_over_its_requirements_with_the_image() -> None:
    pins, image = _pins(), _image()
    assert {"torch", "torchvision", "numpy", "pillow", "onnxruntime"} <= image
    unmet = []
    for name, (version, _) in pins.items():
        for line in _requires(name, version):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(TARGET):
                continue
            needed = _norm(requirement.name)
            if needed in pins:
                if not requirement.specifier.contains(Version(pins[needed][0]), prereleases=True):
                    unmet.append(f"{name} needs {line}, the list has {pins[needed][0]}")
            elif needed not in image and needed not in NOT_CARRIED:
                unmet.append(f"{name} needs {line}: neither listed nor on the image")
    assert not unmet, unmet


def test_the_list_is_small_and_carries_nothing_the_image_has_unless_newer_is_needed() -> None:
    pins = _pins()
    assert sum(size for _, size in pins.values()) < MAX_BYTES
    # typing-extensions is on the image, but pydantic 2.14 needs >= 4.16, newer than it may be.
    assert set(pins) & _image() == {"typing-extensions"}
    assert not set(pins) & NOT_CARRIED and not set(pins) & {"tritonclient", "ray", "grpcio"}


def test_downloaded_wheels_match_the_list() -> None:
    wheels = list((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return  # nothing downloaded here (bash loadtests/gpu/wheels.sh)
    pins = _pins()
    found = {_norm(w.name.split("-")[0]): w for w in wheels}
    assert set(found) == set(pins) and len(found) == len(wheels), "run bash loadtests/gpu/wheels.sh"
    for name, wheel in found.items():
        _, python, abi, platform = wheel.name[: -len(".whl")].rsplit("-", 3)
        assert wheel.name.split("-")[1] == pins[name][0] and wheel.stat().st_size == pins[name][1], wheel.name
        assert python in ("py3", "py2.py3", "cp312") or python.startswith("cp31") and abi == "abi3", (
            wheel.name
        )
        assert platform == "any" or "x86_64" in platform and "manylinux" in platform, wheel.name
