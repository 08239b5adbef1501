"""The agreement measures of the detector and the segmenter through the whole gateway: a candidate that is
the same network (version 2 = version 1's model.pt) agrees fully, one image at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.seeds import fresh_seeds
from support.versions import one_version_repository, write_version
from support.waiting import wait_for
from tests.service.lifecycle.conftest import ADMIN_KEY
from training.shapes import make_scene

ENDPOINT = {"detector": "/detect", "segmenter": "/segment"}
FULL = {"detector": {"box_f1": 1.0, "count_drift": 0.0}, "segmenter": {"mask_iou": 1.0}}


@pytest.mark.parametrize("model", ["detector", "segmenter"])
def test_an_identical_candidate_agrees_fully(model: str, model_repository: Path, tmp_path: Path) -> None:
    import io

    from PIL import Image

    repository = one_version_repository(model_repository, tmp_path / "repository", model)
    settings = Settings(
        model_repository=repository, models=(model,), device="cpu", runtime="torchscript", admin_key=ADMIN_KEY,
        max_batch_size=2, warm_up_batch_sizes=False, shadow_max_pending=16, shadow_busy_requests=16,
        shadow_max_utilisation=1.0,
    )  # fmt: skip
    with TestClient(create_api(settings, LocalBackend(settings))) as client:
        write_version(repository, model, "2", model_repository / model / "1" / "model.pt")
        put = client.put(
            f"/admin/repository/models/{model}/candidate",
            json={"version": "2", "mode": "shadow", "share": 1.0},
            headers={"X-Admin-Key": ADMIN_KEY},
        )
        assert put.status_code == 200, put.text
        found = 0
        for seed in fresh_seeds(3, offset=800):
            buffer = io.BytesIO()
            Image.fromarray(make_scene(seed, 128, 2, 3).image).save(buffer, "PNG")
            response = client.post(ENDPOINT[model], content=buffer.getvalue(), headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text
            result = response.json()["results"][0]
            found += len(result.get("detections", result.get("segments", [])))
        assert found > 0  # the scenes hold shapes the models find: the comparison is not of empty answers

        def summary() -> dict | None:
            body = client.get(f"/admin/repository/models/{model}/candidate", headers={"X-Admin-Key": ADMIN_KEY}).json()
            comparison = body["comparison"]
            return body if comparison and comparison["compared_images"] >= 3 else None

        body = wait_for(summary, 120, "the comparisons never finished")
        assert body["measures"] == list(FULL[model])
        assert body["comparison"]["mean"] == pytest.approx(FULL[model])
