"""Model versions with the Triton backend through Triton's own model repository API: a CPU tritonserver in
`--model-control-mode=explicit` (python backend, one exported model.pt per version) loads a new version
beside the one serving when the gateway's /admin asks, refuses a broken one with Triton's reason, and
serves each version by name; rollback and shadow comparisons work as with the embedded backend."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_api
from service.backends.triton import TritonBackend
from service.settings import Settings
from stack.triton import TritonServer, start_tritonserver
from support.ports import free_ports
from support.versions import CLASSIFIER, link_or_copy, one_version_repository, swap_classes, write_version
from support.waiting import wait_for
from tests.service.lifecycle.conftest import ADMIN_KEY, SWAPPED, scene_png
from tests.triton.conftest import MODEL_LOAD_TIMEOUT_S

ADMIN = {"X-Admin-Key": ADMIN_KEY}
PNG = {"Content-Type": "image/png"}


def write_triton_version(repository: Path, version: str, model_file: Path, cpu_repository: Path) -> None:
    """`<repository>/classifier/<version>/` as the export writes a python-backend version: model.pt + model.py."""
    staging = repository / CLASSIFIER / f".{version}.staging"
    staging.mkdir()
    link_or_copy(model_file, staging / "model.pt")
    shutil.copy2(cpu_repository / CLASSIFIER / "1" / "model.py", staging / "model.py")
    staging.rename(repository / CLASSIFIER / version)


@pytest.fixture(scope="module")
def explicit_triton(
    cpu_repository: Path, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TritonServer, Path, Path]]:
    """A tritonserver in explicit model-control mode over the classifier's version 1, and the gateway's
    repository (the libtorch one, for the contract) with version 1 too."""
    root = tmp_path_factory.mktemp("triton_versions")
    triton_repository = root / "triton"
    (triton_repository / CLASSIFIER).mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt"):
        shutil.copy2(cpu_repository / CLASSIFIER / name, triton_repository / CLASSIFIER / name)
    write_triton_version(triton_repository, "1", cpu_repository / CLASSIFIER / "1" / "model.pt", cpu_repository)
    gateway_repository = one_version_repository(model_repository, root / "gateway")
    server = start_tritonserver(
        triton_repository, *free_ports(3), work_dir=root / "work", ready_timeout_s=MODEL_LOAD_TIMEOUT_S,
        model_control="explicit",
    )  # fmt: skip
    yield server, triton_repository, gateway_repository
    server.stop()


def top1(client: TestClient, index: int, query: str = "") -> tuple[str, str]:
    response = client.post(f"/classify?top_k=1{query}", content=scene_png(index)[0], headers=PNG)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["version"], body["results"][0]["predictions"][0]["label"]


def test_versions_load_roll_back_and_shadow_through_tritons_repository_api(
    explicit_triton: tuple[TritonServer, Path, Path], cpu_repository: Path, model_repository: Path, tmp_path: Path
) -> None:
    server, triton_repository, gateway_repository = explicit_triton
    settings = Settings(
        backend="triton", triton_url=server.grpc_url, models=(CLASSIFIER,), model_repository=gateway_repository,
        triton_admin_token=server.admin_token, admin_key=ADMIN_KEY, shadow_max_pending=64,
        shadow_max_utilisation=1.0,
        request_timeout_s=120,
    )  # fmt: skip
    swapped = swap_classes(model_repository / CLASSIFIER / "1" / "model.pt", tmp_path / "v2.pt")
    with TestClient(create_api(settings, TritonBackend(settings))) as client:
        class0 = next(i for i in range(60) if scene_png(i)[1] == SWAPPED[0])
        assert top1(client, class0)[0] == "1"
        write_triton_version(triton_repository, "2", swapped, cpu_repository)
        write_version(gateway_repository, CLASSIFIER, "2", swapped)
        loaded = client.post(f"/admin/repository/models/{CLASSIFIER}/load", json={"version": "2"}, headers=ADMIN)
        assert loaded.status_code == 200, loaded.text
        assert (loaded.json()["current"], loaded.json()["loaded"]) == ("2", ["1", "2"])
        one, two = top1(client, class0, "&version=1"), top1(client, class0, "&version=2")
        assert (one[0], two[0]) == ("1", "2") and one[1] != two[1], (one, two)  # Triton ran each version
        assert top1(client, class0) == two

        (tmp_path / "garbage.pt").write_bytes(b"not a TorchScript archive")
        write_triton_version(triton_repository, "3", tmp_path / "garbage.pt", cpu_repository)
        refused = client.post(f"/admin/repository/models/{CLASSIFIER}/load", json={"version": "3"}, headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "version_refused", refused.text
        assert "failed to load on Triton" in refused.json()["error"]["message"]
        assert top1(client, class0) == two  # the old ones keep serving
        assert client.app.state.answerer.backend.loaded_versions(CLASSIFIER) == ["1", "2"]

        rolled = client.post(f"/admin/repository/models/{CLASSIFIER}/rollback", headers=ADMIN)
        assert rolled.status_code == 200 and rolled.json()["current"] == "1", rolled.text
        assert top1(client, class0) == one

        client.put(f"/admin/repository/models/{CLASSIFIER}/candidate", json={"version": "2", "share": 1.0}, headers=ADMIN)
        answers = [top1(client, i)[1] for i in range(12)]
        summary = wait_for(
            lambda: (c := client.get("/admin/candidate/summary", headers=ADMIN).json()["models"][0]["comparison"])
            and c["compared_requests"] >= 12 and c,
            120, "the comparisons never finished",
        )  # fmt: skip
        labels = client.get("/models").json()["models"][0]["labels"]
        expected = sum(a not in {labels[i] for i in SWAPPED} for a in answers) / len(answers)
        assert 0 < expected < 1 and summary["mean"]["top1_agreement"] == pytest.approx(expected), (answers, summary)

        client.delete(f"/admin/repository/models/{CLASSIFIER}/candidate", headers=ADMIN)
        unloaded = client.post(f"/admin/repository/models/{CLASSIFIER}/unload", json={"version": "2"}, headers=ADMIN)
        assert unloaded.status_code == 200 and unloaded.json()["loaded"] == ["1"], unloaded.text
