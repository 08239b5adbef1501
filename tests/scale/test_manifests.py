"""deploy/k8s validates against Kubernetes' schemas and the vendored RayService CRD, offline.

Core kinds use kubernetes-validate's strict schemas (unknown fields are errors, as with kubectl's
strict validation); the RayService uses tests/scale/schemas/rayservice-ray.io-v1.json, whose embedded
pod templates and Services resolve to the same core definitions.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from referencing import Registry, Resource

from .cluster import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
RAYSERVICE_SCHEMA = Path(__file__).with_name("schemas") / "rayservice-ray.io-v1.json"
# The oldest and newest Kubernetes minor versions we claim to support.
K8S_VERSIONS = ("1.29", "1.37")


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in deploy/k8s"
    return matches[0]


def _rayservice_validator(version: str) -> jsonschema.Draft202012Validator:
    definitions_path = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    definitions = json.loads((definitions_path / "_definitions.json").read_text())
    registry: Registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _validate(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        _rayservice_validator(version).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _rayservice_pods(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates(version: str) -> None:
    docs = _documents()
    assert {d["kind"] for d in docs} >= {"RayService", "Deployment", "Service", "PersistentVolumeClaim"}
    for doc in docs:
        _validate(doc, version)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("maxReplicas"),
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update({"replica": 2}),
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            {"imagePullPolicy": ["Always"]}
        ),
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            {"resource": {}}
        ),
        lambda d: d["spec"].update({"serveConfig": d["spec"]["serveConfigV2"]}),
    ],
    ids=["non-string-start-param", "missing-maxReplicas", "unknown-group-field", "wrong-type", "typo-in-pod", "v1alpha1-field"],
)
def test_rayservice_schema_rejects_broken_manifests(break_it: Any) -> None:
    broken = copy.deepcopy(_find("RayService", "cvserve"))
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, K8S_VERSIONS[-1])


def test_core_schema_rejects_a_broken_deployment() -> None:
    broken = copy.deepcopy(_find("Deployment", "cvserve-triton"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, K8S_VERSIONS[-1])


def test_triton_uses_gpus_health_probes_and_a_read_only_repository() -> None:
    deployment = _find("Deployment", "cvserve-triton")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-control-mode=explicit" in server["args"] and "--load-model=*" in server["args"]
    assert "--model-repository=/models" in server["args"]
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    _find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    service = _find("Service", "cvserve-triton")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in server["ports"]}
    assert {p["port"] for p in service["spec"]["ports"]} <= ports


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    pods = [_find("Deployment", "cvserve-triton")["spec"]["template"]["spec"]]
    pods += _rayservice_pods(_find("RayService", "cvserve"))
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        for container in _containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_gateway_keeps_ray_ports_inside_the_cluster() -> None:
    rayservice = _find("RayService", "cvserve")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head.get("enableIngress", False) is False
    assert "serveService" not in rayservice["spec"] or rayservice["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    for pod in _rayservice_pods(rayservice):
        mounts = {m["mountPath"]: m for c in _containers(pod) for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
    policy = _find("NetworkPolicy", "cvserve-gateway")
    open_rules = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_rules for p in rule["ports"]] == [8000], "only Serve's port may be open"


def test_every_gateway_pod_requires_the_api_key_secret() -> None:
    """The image listens on 0.0.0.0, so the gateway refuses to start without a key: no pod may start without it."""
    for pod in _rayservice_pods(_find("RayService", "cvserve")):
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            reference = env["CVSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert (reference["name"], reference["key"]) == ("cvserve-api-key", "key")
            assert reference.get("optional", False) is False
            assert "CVSERVE_ALLOW_ANONYMOUS" not in env


def test_serve_config_v2_is_the_generated_triton_config() -> None:
    rayservice = _find("RayService", "cvserve")
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    generated = yaml.safe_load((REPO_ROOT / "deploy" / "serve" / "cvserve-triton.yaml").read_text())
    assert embedded == generated, "run `python -m service.deploy.serve_config write`"
    ServeDeploySchema.model_validate(embedded)
    (application,) = embedded["applications"]
    host, port = application["args"]["triton_url"].split(":")
    triton = _find("Service", host)
    assert int(port) in {p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc"}
    assert application["args"]["model_repository"] == "/models"
