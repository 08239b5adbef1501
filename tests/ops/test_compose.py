"""docker-compose.yml, Dockerfile and the Prometheus/Grafana files it mounts: valid and safe.

No Docker engine here, so the compose file is checked against the Compose Specification's JSON
schema (vendored in deploy/compose/) and for the properties the issue asks for.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "deploy" / "compose" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "cvserve.json"

RAY_PORTS = {6379, 8265, 10001, 8090}  # GCS, dashboard, client, metrics export


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification(compose, validator) -> None:
    assert _errors(validator, compose) == []


@pytest.mark.parametrize(
    "mutation",
    [
        lambda c: c["services"]["gateway"].update(publish=["8000"]),  # unknown service key
        lambda c: c["services"]["tritonserver"]["deploy"]["resources"]["reservations"]["devices"][0].pop(
            "capabilities"
        ),
        lambda c: c["services"]["grafana"].update(healthcheck={"test": ["CMD", "true"], "interval": 10}),
    ],
    ids=["unknown-key", "gpu-without-capabilities", "interval-not-a-duration-string"],
)
def test_the_schema_rejects_broken_variants(compose, validator, mutation) -> None:
    broken = copy.deepcopy(compose)
    mutation(broken)
    assert _errors(validator, broken), "the vendored schema accepted an invalid compose file"


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume["type"] == "bind":
                sources.append(volume["source"])
        elif volume.split(":", 1)[0].startswith((".", "/")):
            sources.append(volume.split(":", 1)[0])
    return sources


def test_everything_mounted_or_built_exists(compose) -> None:
    missing = []
    for name, service in compose["services"].items():
        for source in _bind_sources(service):
            if not (ROOT / source).exists():
                missing.append(f"{name}: bind source {source}")
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            for path in (context, dockerfile):
                if not path.exists():
                    missing.append(f"{name}: build path {path.relative_to(ROOT)}")
    assert missing == []


def test_named_volumes_and_secrets_are_declared(compose) -> None:
    declared_volumes = set(compose.get("volumes", {}))
    declared_secrets = set(compose.get("secrets", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":", 1)[0] in declared_volumes, f"{name}: undeclared volume {volume}"
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in declared_secrets, f"{name}: undeclared secret {secret_name}"


def _copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_dockerfile_copies_only_existing_allow_listed_sources() -> None:
    dockerfile = DOCKERFILE.read_text()
    allowed = {
        line.strip()[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    }
    sources = _copy_sources(dockerfile)
    assert sources, "Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile COPY source {source} does not exist"
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
        assert not source.startswith(("model_repository", "artifacts", "build")), (
            f"{source}: no weights in images"
        )


def test_dockerfile_runs_the_gateway_as_non_root() -> None:
    instructions = [line.split(maxsplit=1) for line in DOCKERFILE.read_text().splitlines() if line.strip()]
    instructions = [words for words in instructions if not words[0].startswith("#")]
    froms = [words[1] for words in instructions if words[0] == "FROM"]
    users = [words[1].split(":")[0] for words in instructions if words[0] == "USER"]
    cmds = [words[1] for words in instructions if words[0] == "CMD"]
    assert froms == ["python:3.11-slim"]
    assert users and users[-1] not in {"root", "0"}
    assert json.loads(cmds[-1]) == ["python", "-m", "service"]


def _published_host_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host ip or '', container port) for every published port, short or long syntax."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((port.get("host_ip", ""), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        published.append((host_ip, int(parts[-1])))
    return published


def test_only_the_gateway_http_port_is_published_for_the_gateway(compose) -> None:
    assert [port for _, port in _published_host_ports(compose["services"]["gateway"])] == [8000]
    for name, service in compose["services"].items():
        leaked = {port for _, port in _published_host_ports(service)} & RAY_PORTS
        assert not leaked, f"{name} publishes Ray ports {leaked}"


def test_triton_is_explicit_restricted_gpu_backed_and_not_published(compose) -> None:
    triton = compose["services"]["tritonserver"]
    command = triton["command"]
    assert "nvcr.io/nvidia/tritonserver:" in triton["image"]  # ${TRITON_IMAGE:-<default tag>}
    # every model at start; versions change only through the restricted repository API (issue 27)
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        restricted = [arg for arg in command if arg.startswith(flag)]
        assert restricted, f"missing {flag}"
        apis, _, header = restricted[0][len(flag) :].partition(":")
        assert {"model-repository", "shared-memory"} <= set(apis.split(","))
        assert re.fullmatch(r"[\w-]+=\$\{TRITON_ADMIN_TOKEN:\?[^}]+\}", header), (
            "admin token must be required"
        )
    assert _published_host_ports(triton) == []
    mounts = [v for v in triton["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
    assert mounts and mounts[0]["read_only"] is True
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device.get("driver") == "nvidia" for device in devices)


# Oldest images past the advisories docs/SECURITY.md lists (Triton: NVIDIA's bulletins through May
# 2026; Grafana: its 2025-26 advisories); bump these with the images.
MIN_TRITON_RELEASE = (26, 6)
MIN_GRAFANA = (12, 4, 5)


def _default_tag(image: str) -> str:
    """The tag of `${VAR:-repo:tag}` or `repo:tag`."""
    return image.rstrip("}").rsplit(":", 1)[1]


def test_images_are_past_their_published_advisories(compose) -> None:
    triton_tag = _default_tag(compose["services"]["tritonserver"]["image"])
    assert tuple(int(part) for part in triton_tag.removesuffix("-py3").split(".")) >= MIN_TRITON_RELEASE
    k8s = (ROOT / "deploy/k8s/triton.yaml").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{triton_tag}" in k8s, "compose and Kubernetes run different Tritons"
    grafana_tag = _default_tag(compose["services"]["grafana"]["image"])
    assert tuple(int(part) for part in grafana_tag.split(".")) >= MIN_GRAFANA


def test_triton_accepts_the_gateways_keepalive_pings(compose) -> None:
    from service.backends.triton import TRITON_KEEPALIVE_FLAGS
    from stack.triton import server_command

    k8s = (ROOT / "deploy/k8s/triton.yaml").read_text()
    local = server_command(Path("/models"), 1, 2, 3, Path("/backends"), "token", 0)
    for flag in TRITON_KEEPALIVE_FLAGS:
        assert flag in compose["services"]["tritonserver"]["command"], flag
        assert f"- {flag}" in k8s, flag
        assert flag in local, flag


def _default(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is unset (a plain value as it is)."""
    match = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
    return match.group(1) if match else value


def test_gateway_uses_triton_backend_from_env(compose) -> None:
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    assert env["CVSERVE_BACKEND"] == "triton"
    # the gateway's /admin needs its own key, and Triton's repository API token to load versions there
    assert re.fullmatch(r"\$\{CVSERVE_ADMIN_KEY:\?[^}]+\}", env["CVSERVE_ADMIN_KEY"])
    assert re.fullmatch(r"\$\{TRITON_ADMIN_TOKEN:\?[^}]+\}", env["CVSERVE_TRITON_ADMIN_TOKEN"])
    # gRPC to Triton's gRPC port unless .env says otherwise (HTTP with tracing, deploy/env.example).
    assert (_default(env["CVSERVE_TRITON_URL"]), _default(env["CVSERVE_TRITON_PROTOCOL"])) == (
        "tritonserver:8001",
        "grpc",
    )
    example = (ROOT / "deploy/env.example").read_text()
    assert "# CVSERVE_TRITON_PROTOCOL=http\n# CVSERVE_TRITON_URL=tritonserver:8000\n" in example
    assert gateway["depends_on"]["tritonserver"]["condition"] == "service_healthy"
    mounts = [
        v
        for v in gateway["volumes"]
        if isinstance(v, dict) and v["target"] == env["CVSERVE_MODEL_REPOSITORY"]
    ]
    assert mounts and mounts[0]["read_only"] is True


def test_grafana_has_no_anonymous_or_default_admin(compose) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env, "the password must come from the secret, not the file"
    secret_path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert secret_path == "/run/secrets/grafana_admin_password"
    assert compose["secrets"]["grafana_admin_password"] == {"environment": "GRAFANA_ADMIN_PASSWORD"}
    assert f"test -s {secret_path}" in " ".join(grafana["entrypoint"]), "must refuse an empty password"


def test_every_service_has_a_healthcheck_and_a_restart_policy(compose) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name


def test_prometheus_scrapes_the_compose_services(compose) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    metrics_port = compose["services"]["gateway"]["environment"]["CVSERVE_RAY_METRICS_PORT"]
    triton_metrics = next(
        arg.split("=", 1)[1]
        for arg in compose["services"]["tritonserver"]["command"]
        if arg.startswith("--metrics-port=")
    )
    assert targets == {
        "gateway": [f"gateway:{metrics_port}"],
        "triton": [f"tritonserver:{triton_metrics}"],
        "prometheus": ["localhost:9090"],
    }
    mounts = [v for v in compose["services"]["prometheus"]["volumes"] if isinstance(v, dict)]
    assert {"source": "./deploy/prometheus", "target": "/etc/prometheus"}.items() <= mounts[0].items()


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus(compose) -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cvserve.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    mounts = {
        v["source"]: v["target"] for v in compose["services"]["grafana"]["volumes"] if isinstance(v, dict)
    }
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert providers["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    dashboard = json.loads(DASHBOARD.read_text())
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")["current"][
        "value"
    ]
    assert default == source["uid"]
