"""Model versions while serving, in process over the real TorchScript classifier: every loaded version
answers, a new one is loaded, warmed up and checked before it takes traffic, a broken one is refused
with its reason while the old one keeps serving, rollback is instant, the admin surface has its own key
and every change is logged with who asked."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from tests.service.lifecycle.conftest import ADMIN_KEY, API_KEY, MODEL, scene_png, write_version

ADMIN = {"X-Admin-Key": ADMIN_KEY}
CLIENT = {"X-API-Key": API_KEY, "Content-Type": "image/png"}


def settings_for(repository: Path, **extra: object) -> Settings:
    return Settings(
        model_repository=repository, models=(MODEL,), device="cpu", runtime="torchscript",
        api_key=API_KEY, admin_key=ADMIN_KEY, **extra,
    )  # fmt: skip


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    settings = settings_for(repository)
    with TestClient(create_api(settings, LocalBackend(settings))) as session:
        yield session


def classify(client: TestClient, index: int = 0, query: str = "") -> dict:
    data, _ = scene_png(index)
    response = client.post(f"/classify?top_k=1{query}", content=data, headers=CLIENT)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_new_version_is_loaded_and_becomes_current(client: TestClient, repository: Path, swapped_classifier: Path) -> None:
    assert classify(client)["version"] == "1"
    write_version(repository, "2", swapped_classifier)
    index = client.post("/admin/repository/index", headers=ADMIN).json()
    assert [(row["version"], row["state"]) for row in index] == [("1", "READY"), ("2", "UNAVAILABLE")]
    loaded = client.post(f"/admin/repository/models/{MODEL}/load", headers=ADMIN)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() | {"loaded": None} == {
        "name": MODEL, "current": "2", "previous": "1", "candidate": None, "loaded": None
    }  # fmt: skip
    assert loaded.json()["loaded"] == ["1", "2"]
    assert classify(client)["version"] == "2"
    backend = client.app.state.answerer.backend
    assert backend._versions[MODEL]["2"].model.batch_sizes_run == set(range(1, 9))  # warmed at every size


def test_every_loaded_version_answers_by_name(client: TestClient, repository: Path, swapped_classifier: Path) -> None:
    write_version(repository, "2", swapped_classifier)
    response = client.post(f"/admin/repository/models/{MODEL}/load", json={"version": "2", "activate": False}, headers=ADMIN)
    assert response.status_code == 200 and response.json()["current"] == "1", response.text
    # versions 1 and 2 differ exactly on classes 0 and 1: find an image of class 0
    index = next(i for i in range(60) if scene_png(i)[1] == 0)
    one, two = classify(client, index, "&version=1"), classify(client, index, "&version=2")
    assert (one["version"], two["version"]) == ("1", "2")
    assert one["results"][0]["predictions"][0]["label"] != two["results"][0]["predictions"][0]["label"]
    assert classify(client, index)["version"] == "1"  # no version asked: the current one
    missing = client.post("/classify?version=7", content=scene_png(0)[0], headers=CLIENT)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"
    models = client.get("/models").json()["models"]
    assert len(models) == 1
    versions = models[0]["versions"]
    assert [(v["version"], v["role"]) for v in versions] == [("1", "current"), ("2", "loaded")]
    assert all(v["input_size"] == {"width": 64, "height": 64} and len(v["labels"]) == 5 for v in versions)
    assert all(v["weights"] == "demo" for v in versions)
    meta = client.get(f"/v2/models/{MODEL}/versions/2").json()
    assert meta["versions"] == ["1", "2"]
    oip = client.post(
        f"/v2/models/{MODEL}/versions/2/infer",
        json={"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [__import__("base64").b64encode(scene_png(index)[0]).decode()]}]},
        headers={"X-API-Key": API_KEY},
    )
    assert oip.status_code == 200, oip.text
    assert oip.json()["model_version"] == "2"


@pytest.mark.parametrize("broken", ["garbage", "contract"])
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    client: TestClient, repository: Path, broken_classifier: dict[str, Path], broken: str
) -> None:
    write_version(repository, "3", broken_classifier[broken])
    response = client.post(f"/admin/repository/models/{MODEL}/load", json={"version": "3"}, headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "version_refused"
    assert ("failed to load" if broken == "garbage" else "breaks its contract") in error["message"], error
    assert classify(client)["version"] == "1"
    rows = {row["version"]: row for row in client.post("/admin/repository/index", headers=ADMIN).json()}
    assert rows["3"]["state"] == "UNAVAILABLE" and rows["3"]["reason"] == error["message"]
    assert client.app.state.answerer.lifecycle.loaded(MODEL) == ["1"]


def test_rollback_is_one_instant_call(client: TestClient, repository: Path, swapped_classifier: Path) -> None:
    none = client.post(f"/admin/repository/models/{MODEL}/rollback", headers=ADMIN)
    assert none.status_code == 409 and none.json()["error"]["code"] == "no_previous_version"
    write_version(repository, "2", swapped_classifier)
    assert client.post(f"/admin/repository/models/{MODEL}/load", headers=ADMIN).json()["current"] == "2"
    began = time.perf_counter()
    rolled = client.post(f"/admin/repository/models/{MODEL}/rollback", headers=ADMIN)
    took = time.perf_counter() - began
    assert rolled.status_code == 200 and rolled.json()["current"] == "1" and rolled.json()["previous"] == "2"
    assert took < 0.5, f"rollback took {took:.3f} s"  # a reference swap: no load, no warm-up
    assert classify(client)["version"] == "1"
    in_use = client.post(f"/admin/repository/models/{MODEL}/unload", json={"version": "1"}, headers=ADMIN)
    assert in_use.status_code == 409
    unloaded = client.post(f"/admin/repository/models/{MODEL}/unload", json={"version": "2"}, headers=ADMIN)
    assert unloaded.status_code == 200 and unloaded.json()["loaded"] == ["1"] and unloaded.json()["previous"] is None


def test_the_admin_surface_needs_its_own_key(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    for headers in ({}, {"X-API-Key": API_KEY}, {"X-Admin-Key": API_KEY}, {"X-Admin-Key": "x" * 24}):
        response = client.post("/admin/repository/index", headers=headers)
        assert response.status_code == 401, (headers, response.text)
    assert client.post("/admin/repository/index", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    with caplog.at_level(logging.WARNING, logger="cvserve.lifecycle"):
        client.delete(f"/admin/repository/models/{MODEL}/candidate", headers=ADMIN)
    changes = [r.getMessage() for r in caplog.records if r.name == "cvserve.lifecycle"]
    assert changes, "the change was not logged"
    key_id = client.app.state.answerer.lifecycle and __import__("hashlib").sha256(ADMIN_KEY.encode()).hexdigest()[:8]
    assert f"by key {key_id} from testclient" in changes[-1], changes
    assert ADMIN_KEY not in " ".join(changes)


def test_no_admin_surface_on_a_network_address_without_an_admin_key(repository: Path) -> None:
    settings = Settings(model_repository=repository, models=(MODEL,), device="cpu", runtime="torchscript",
                        host="0.0.0.0", api_key=API_KEY)  # fmt: skip
    assert not settings.admin_open
    with TestClient(create_api(settings, LocalBackend(settings))) as session:
        assert session.post("/admin/repository/index").status_code == 404
    with pytest.raises(ValueError, match="admin_key must differ"):
        Settings(model_repository=repository, api_key=API_KEY, admin_key=API_KEY)
    assert settings_for(repository, host="0.0.0.0").admin_open  # with its own key it is served


def test_the_repository_watcher_loads_a_new_version_and_refuses_a_broken_one(
    repository: Path, swapped_classifier: Path, broken_classifier: dict[str, Path]
) -> None:
    import asyncio

    from service.core.versions import RepositoryWatcher

    settings = settings_for(repository)
    api = create_api(settings, LocalBackend(settings))
    lifecycle = api.state.answerer.lifecycle
    watcher = RepositoryWatcher(lifecycle, repository, 0.05)

    async def polls(count: int) -> None:
        for _ in range(count):
            await watcher.poll()

    write_version(repository, "2", broken_classifier["contract"])
    asyncio.run(polls(3))
    assert lifecycle.current(MODEL) == "1" and "breaks its contract" in lifecycle.refused[MODEL, "2"]
    write_version(repository, "3", swapped_classifier)
    asyncio.run(polls(1))
    assert lifecycle.current(MODEL) == "1"  # seen once: it may still be being written
    asyncio.run(polls(1))
    assert lifecycle.current(MODEL) == "3" and lifecycle.states[MODEL].previous == "1"
    api.state.answerer.close()


def test_the_cli_loads_and_rolls_back(repository: Path, swapped_classifier: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cvserve admin` against a gateway in a uvicorn thread (main() in this process)."""
    import json

    from cvserve.cli import main
    from tests.service.lifecycle.conftest import served

    settings = settings_for(repository)
    with served(create_api(settings, LocalBackend(settings))) as url:
        write_version(repository, "2", swapped_classifier)
        base = ["--url", url, "--admin-key", ADMIN_KEY]
        assert main(["admin", "load", MODEL, *base]) == 0
        assert json.loads(capsys.readouterr().out)["current"] == "2"
        assert main(["admin", "rollback", MODEL, *base]) == 0
        assert json.loads(capsys.readouterr().out)["current"] == "1"
        assert main(["admin", "candidate", MODEL, "--version", "2", "--mode", "canary", "--share", "0.5", *base]) == 0
        assert json.loads(capsys.readouterr().out)["candidate"] == {"version": "2", "mode": "canary", "share": 0.5}
        assert main(["admin", "summary", *base]) == 0
        assert json.loads(capsys.readouterr().out)["models"][0]["candidate"]["mode"] == "canary"
        assert main(["admin", "rollback", MODEL, "--url", url, "--admin-key", "w" * 20]) == 1
        assert "401 unauthorized" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["admin", "unload", MODEL, *base])  # no --version: a usage error


def test_a_served_gateway_watches_its_repository(repository: Path, swapped_classifier: Path) -> None:
    """CVSERVE_REPOSITORY_POLL_S: the watcher runs in the app's lifespan and makes a new version current."""
    import httpx

    from support.waiting import wait_for
    from tests.service.lifecycle.conftest import served

    settings = settings_for(repository, repository_poll_s=0.2)
    with served(create_api(settings, LocalBackend(settings))) as url:
        data = scene_png(0)[0]

        def version() -> str:
            return httpx.post(f"{url}/classify", content=data, headers=CLIENT, timeout=30).json()["version"]

        assert version() == "1"
        write_version(repository, "2", swapped_classifier)
        wait_for(lambda: version() == "2", 60, "the watcher never made version 2 current")
        models = httpx.get(f"{url}/models", timeout=30).json()["models"][0]["versions"]
        assert [(v["version"], v["role"]) for v in models] == [("1", "previous"), ("2", "current")]


def test_the_admin_key_is_its_own_security_scheme(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key" and schemes["AdminKeyHeader"]["name"] == "X-Admin-Key"
    admin_paths = [path for path in spec["paths"] if path.startswith("/admin/")]
    assert len(admin_paths) == 7, admin_paths
    for path in admin_paths:
        for operation in spec["paths"][path].values():
            assert operation["security"] == [{"AdminKeyHeader": []}], path
