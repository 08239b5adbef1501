"""Every examples/*.py runs against the session gateway, and README's client snippets are what they run.

An example says what it prints with `# expects: <regex>` lines (searched in its output, multi-line mode)
and what it needs beyond cvserve's own dependencies with `# requires: <module>` (skipped without it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import ROOT
from training.shapes import make_scene

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# the sample images and the scenes they are (so their answers are known, not made up)
SAMPLES = {"circle.png": (7002, 128, 1, 1), "shapes.png": (7102, 128, 3, 3)}


def header(path: Path, key: str) -> list[str]:
    return re.findall(rf"^# {key}: (.+)$", path.read_text(), flags=re.MULTILINE)


def test_there_are_examples_and_each_says_what_it_prints() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "classify.py",
        "detect_annotate.py",
        "segment_polygons.py",
        "client_async.py",
    }
    for path in EXAMPLES:
        assert header(path, "expects"), f"{path.name} has no '# expects: <regex>' line"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_against_the_gateway(embedded_gateway: str, path: Path, tmp_path: Path) -> None:
    for module in header(path, "requires"):
        if importlib.util.find_spec(module.strip()) is None:
            pytest.skip(f"{path.name} needs {module.strip()}")
    env = {k: v for k, v in os.environ.items() if k != "CVSERVE_API_KEY"} | {"CVSERVE_URL": embedded_gateway}
    done = subprocess.run(
        [sys.executable, str(path)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in header(path, "expects"):
        assert re.search(expected, done.stdout, flags=re.MULTILINE), (
            f"no match for {expected!r} in:\n{done.stdout}"
        )


def test_sample_images_are_the_scenes_they_claim() -> None:
    for name, (seed, size, low, high) in SAMPLES.items():
        pixels = np.asarray(Image.open(ROOT / "examples" / "images" / name).convert("RGB"))
        assert np.array_equal(pixels, make_scene(seed, size, low, high).image), name
        assert (ROOT / "examples" / "images" / name).stat().st_size < 50_000


def test_readme_snippets_are_taken_from_the_examples() -> None:
    """A README block starting `# examples/<file>.py` must be a run of that example's lines (indent aside)."""
    blocks = re.findall(
        r"```python\n# (examples/\S+\.py)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL
    )
    assert len(blocks) >= 3, "README has too few ```python blocks taken from examples/"
    for name, body in blocks:
        wanted = textwrap.dedent(body).splitlines()
        lines = (ROOT / name).read_text().splitlines()
        runs = (
            textwrap.dedent("\n".join(lines[i : i + len(wanted)])).splitlines() for i in range(len(lines))
        )
        assert wanted in runs, f"README's block from {name} is not in {name} any more:\n{body}"
