"""Fixtures for the scale-out tests: the exported model repository and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def exported_repository() -> Path:
    """The exported models (`make models`); CVSERVE_TEST_MODEL_REPOSITORY may point elsewhere."""
    path = Path(os.environ.get("CVSERVE_TEST_MODEL_REPOSITORY", REPO_ROOT / "model_repository")).resolve()
    missing = [m for m in ("classifier", "detector", "segmenter") if not (path / m / "config.pbtxt").is_file()]
    if missing:
        pytest.fail(f"{path} lacks exported models {missing}: run `make models`", pytrace=False)
    return path
