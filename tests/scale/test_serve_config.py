"""The committed Serve configs match what the application code builds, and Ray accepts them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeDeploySchema

from service.deploy import serve_config
from service.deploy.serve_config import PROFILES, RAYSERVICE_PATH, app_builder, build_config, render

from .cluster import REPO_ROOT

CONFIG_FILES = sorted(PROFILES)


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / path).read_text())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_committed_config_is_what_the_code_generates(path: Path, model_repository: Path) -> None:
    expected = render(build_config(PROFILES[path], model_repository), PROFILES[path])
    assert (REPO_ROOT / path).read_text() == expected, f"{path} is stale: run `python -m service.deploy.serve_config write`"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_config_deploys_through_its_import_path(
    path: Path, model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Do what `serve deploy` does with the file: validate, call the builder with its args, match names."""
    monkeypatch.setenv("CVSERVE_API_KEY", "k" * 24)  # as the cluster's Secret provides it
    config = ServeDeploySchema.model_validate(_load(path))
    (application,) = config.applications
    builder = import_attr(application.import_path)
    args = {**application.args, "model_repository": str(model_repository)}
    built = build_serve_app(call_user_app_builder_with_args_if_necessary(builder, args), name=application.name)

    in_code = {d.name: d for d in built.deployments}
    in_file = {d.name: d for d in application.deployments}
    assert set(in_file) == set(in_code), "the file overrides deployments the code does not build (or misses some)"
    for name, options in in_file.items():
        code = in_code[name]
        assert options.max_ongoing_requests == code.max_ongoing_requests, name
        assert options.max_queued_requests == code.max_queued_requests, name
        if "user_config" in options.model_fields_set:
            assert options.user_config == code.user_config, name
        else:
            assert code.user_config is None, name
        assert options.ray_actor_options.model_dump(exclude_unset=True) == code.ray_actor_options, name
        scaling = options.autoscaling_config
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
        assert 0 < scaling["target_ongoing_requests"] <= options.max_ongoing_requests, name


def test_model_deployments_batch_and_ask_for_gpus() -> None:
    config = _load(Path("deploy/serve/cvserve.yaml"))
    (application,) = config["applications"]
    models = [d for d in application["deployments"] if d["name"] in ("classifier", "detector", "segmenter")]
    assert len(models) == 3
    for deployment in models:
        assert deployment["ray_actor_options"]["num_gpus"] > 0
        assert deployment["user_config"]["max_batch_size"] > 1
        # A replica must accept enough concurrent calls for its batches to fill.
        assert deployment["max_ongoing_requests"] >= deployment["user_config"]["max_batch_size"]


def test_triton_config_has_no_model_deployments() -> None:
    (application,) = _load(Path("deploy/serve/cvserve-triton.yaml"))["applications"]
    assert application["args"]["backend"] == "triton"
    assert [d["name"] for d in application["deployments"]] == ["Gateway"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_config_on_a_network_address_refuses_to_build_without_a_key(
    path: Path, model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve deploy` of a committed file on a cluster without CVSERVE_API_KEY fails closed."""
    monkeypatch.delenv("CVSERVE_API_KEY", raising=False)
    monkeypatch.delenv("CVSERVE_ALLOW_ANONYMOUS", raising=False)
    config = _load(path)
    (application,) = config["applications"]
    assert application["args"]["host"] == config["http_options"]["host"] == "0.0.0.0"
    with pytest.raises(ValueError, match="CVSERVE_API_KEY is unset"):
        app_builder({**application["args"], "model_repository": str(model_repository)})
    monkeypatch.setenv("CVSERVE_ALLOW_ANONYMOUS", "true")  # said on purpose: it builds
    assert app_builder({**application["args"], "model_repository": str(model_repository)}) is not None


def test_builder_refuses_unknown_args() -> None:
    with pytest.raises(ValueError, match="modle_replicas"):
        app_builder({"backend": "embedded", "modle_replicas": 2})


def test_check_reports_drift(tmp_path: Path, model_repository: Path) -> None:
    for path in [*CONFIG_FILES, RAYSERVICE_PATH]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / path, tmp_path / path)
    argv = ["check", "--root", str(tmp_path), "--model-repository", str(model_repository)]
    assert serve_config.main(argv) == 0

    original = (tmp_path / CONFIG_FILES[0]).read_text()
    edited = original.replace("max_ongoing_requests: 64", "max_ongoing_requests: 65", 1)
    assert edited != original
    (tmp_path / CONFIG_FILES[0]).write_text(edited)
    assert serve_config.main(argv) == 1
    assert serve_config.main(["write", *argv[1:]]) == 0
    assert serve_config.main(argv) == 0
