"""The `cvserve` command, run as a subprocess against the session gateway and the keyed in-process API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.client.conftest import KEY, png, single_shape
from training.shapes import CLASSES, make_scene

CVSERVE = Path(sys.executable).with_name("cvserve")


def cvserve(
    *args: str | Path, url: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (`pip install -e .` creates it) with `--url url`."""
    assert CVSERVE.is_file(), f"{CVSERVE} is missing: run `pip install -e .`"
    environment = {k: v for k, v in os.environ.items() if k != "CVSERVE_API_KEY"} | (env or {})
    command = [str(CVSERVE), *map(str, args), "--url", url]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=environment)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    scene = make_scene(4_000_000, 128, 2, 3)
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    path.write_bytes(png(scene.image))
    return path, sorted({CLASSES[int(label) - 1] for label in scene.labels})


def test_detect_prints_the_boxes_and_writes_the_drawing(
    embedded_gateway: str, scene_file: tuple[Path, list[str]], tmp_path: Path
) -> None:
    path, labels = scene_file
    out = tmp_path / "boxes.png"
    done = cvserve("detect", path, "--annotate", out, url=embedded_gateway)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{path}  128x128  ") and lines[-1] == f"wrote {out}"
    printed = sorted({line.split()[0] for line in lines[1:-1]})
    assert printed == labels, done.stdout
    assert Image.open(out).size == (128, 128)


def test_json_output_is_the_gateways_answer(
    embedded_gateway: str, scene_file: tuple[Path, list[str]]
) -> None:
    path, _ = scene_file
    done = cvserve(
        "segment", path, path, "--polygons", "--polygon-tolerance", "2", "--json", url=embedded_gateway
    )
    assert done.returncode == 0, done.stderr
    files = [("files", ("a.png", path.read_bytes(), "image/png"))] * 2
    params = {"return_polygons": "true", "polygon_tolerance": 2}
    expected = httpx.post(embedded_gateway + "/segment", params=params, files=files, timeout=60).json()
    assert json.loads(done.stdout) == expected
    summary = cvserve("segment", path, "--polygons", url=embedded_gateway)
    assert summary.returncode == 0 and "polygon" in summary.stdout and "vertices" in summary.stdout


def test_classify_batches_many_files(embedded_gateway: str, tmp_path: Path) -> None:
    files, labels = [], []
    for i in range(5):
        image, label = single_shape(4_000_100 + i)
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(image))
        labels.append(label)
    done = cvserve("classify", *files, "--top-k", "1", "--batch", "2", url=embedded_gateway)
    assert done.returncode == 0, done.stderr
    said = [line.split()[-2] for line in done.stdout.splitlines()]
    assert len(said) == 5 and sum(s == t for s, t in zip(said, labels, strict=True)) >= 4, (said, labels)


def test_failures_exit_non_zero_with_the_gateways_message(embedded_gateway: str, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    done = cvserve("classify", text, url=embedded_gateway)
    assert done.returncode == 1 and "400 undecodable_image" in done.stderr and done.stdout == ""
    missing = cvserve("classify", tmp_path / "nope.png", url=embedded_gateway)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    refused = cvserve("detect", text, "--score-threshold", "2", url=embedded_gateway)
    assert refused.returncode == 1 and "422 invalid_request" in refused.stderr


def test_the_api_key_from_the_flag_or_the_environment(keyed_url: str, tmp_path: Path) -> None:
    image, label = single_shape(7002)
    path = tmp_path / "one.png"
    path.write_bytes(png(image))
    refused = cvserve("classify", path, url=keyed_url)
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr
    assert cvserve("classify", path, "--api-key", "x" * 20, url=keyed_url).returncode == 1
    for args, env in (((path, "--api-key", KEY), None), ((path,), {"CVSERVE_API_KEY": KEY})):
        done = cvserve("classify", *args, "--top-k", "1", url=keyed_url, env=env)
        assert done.returncode == 0 and done.stdout.split()[2] == label, done.stdout + done.stderr


def test_models_and_ready_describe_the_gateway(embedded_gateway: str) -> None:
    listed = cvserve("models", url=embedded_gateway)
    assert listed.returncode == 0, listed.stderr
    served = httpx.get(f"{embedded_gateway}/models", timeout=30).json()["models"]
    lines = listed.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [[m["name"], m["task"], m["endpoint"]] for m in served]
    assert all(f"{len(m['labels'])} labels" in line for m, line in zip(served, lines, strict=True))
    as_json = cvserve("models", "--json", url=embedded_gateway)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["models"] == served
    ready = cvserve("ready", url=embedded_gateway)
    assert (ready.returncode, ready.stdout.strip()) == (0, "ready (embedded backend)")


def test_ready_exits_1_when_nothing_answers() -> None:
    from support.ports import free_port

    done = cvserve("ready", "--timeout", "5", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and done.stderr.startswith("cvserve: ") and "Traceback" not in done.stderr
