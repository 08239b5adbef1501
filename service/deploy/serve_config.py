"""Serve config files for `serve deploy` / `serve run` / KubeRay, generated from the application code.

A Serve config overrides deployments by name, so its names and options must match what
`service.deploy.serve.build_app` builds. Like Ray's `serve build`, this module builds the application from a
profile's settings and writes each deployment's options as the code sets them; it adds only what
`Settings` cannot express: autoscaling and Ray custom resources. `python -m service.deploy.serve_config check`
fails when a committed file no longer matches the code; `write` regenerates them (and the RayService's
embedded copy).

`app_builder` is the config's `import_path`: Serve calls it with the config's `args`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ray.serve import Application
from ray.serve.deployment import Deployment, deployment_to_schema
from ray.serve.schema import ServeDeploySchema

from service.deploy.serve import build_app, serve_deployments
from service.settings import Settings

log = logging.getLogger(__name__)

IMPORT_PATH = "service.deploy.serve_config:app_builder"
REPO_ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE_PATH = Path("deploy/k8s/rayservice.yaml")


def app_builder(args: dict[str, Any]) -> Application:
    """Build the gateway from a Serve config's `args` (Settings fields; CVSERVE_* env fills the rest)."""
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown cvserve args {unknown}; valid names are the fields of service.settings.Settings")
    return build_app(Settings(**args))


@dataclass(frozen=True)
class Autoscaling:
    """Serve autoscaling for one group of deployments (replaces a fixed replica count)."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float

    def as_config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }


@dataclass(frozen=True)
class Scaling:
    """What a cluster adds to a deployment group: autoscaling and custom resources per replica."""

    autoscaling: Autoscaling | None = None
    resources: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """One way to run the gateway on a Ray cluster; `args` are Settings fields, as in the file."""

    args: Mapping[str, Any]
    ingress: Scaling = Scaling()
    models: Scaling = Scaling()
    name: str = "cvserve"
    route_prefix: str = "/"
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    description: str = ""


# GPU nodes running the models in Serve: each model replica gets a quarter GPU, so the three models
# start on one GPU and autoscale from there; a replica is added past 2 batches of queued images.
EMBEDDED_GPU = Profile(
    args={
        "backend": "embedded",
        "model_placement": "deployment",
        "device": "cuda",
        "model_repository": "/models",
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.01,
        "model_num_cpus": 1.0,
        "model_num_gpus": 0.25,
        "ingress_num_cpus": 1.0,
    },
    ingress=Scaling(Autoscaling(min_replicas=1, max_replicas=4, target_ongoing_requests=32)),
    models=Scaling(Autoscaling(min_replicas=1, max_replicas=4, target_ongoing_requests=16)),
    description="embedded backend: TorchScript models as Serve deployments on GPU workers",
)

# The Kubernetes gateway: Serve runs only the ingress; Triton (deploy/k8s/triton.yaml) runs the models
# and batches them, so there are no model deployments to scale here.
TRITON_K8S = Profile(
    args={
        "backend": "triton",
        "triton_url": "cvserve-triton:8001",
        "triton_protocol": "grpc",
        "model_repository": "/models",
        "ingress_num_cpus": 1.0,
    },
    ingress=Scaling(Autoscaling(min_replicas=2, max_replicas=8, target_ongoing_requests=32)),
    description="triton backend: the gateway on KubeRay in front of Service cvserve-triton",
)

# Committed files, relative to the repository root.
PROFILES: dict[Path, Profile] = {
    Path("deploy/serve/cvserve.yaml"): EMBEDDED_GPU,
    Path("deploy/serve/cvserve-triton.yaml"): TRITON_K8S,
}


def build_config(profile: Profile, model_repository: Path) -> dict[str, Any]:
    """The Serve config (ServeDeploySchema as a dict) for `profile`, with options read from the code.

    `build_app` reads each model's contract, so the graph is built against a local `model_repository`;
    the file keeps the profile's own path (where the cluster mounts the repository).
    """
    # Settings without the environment: a generated file must not depend on who generated it. The
    # key comes from the cluster's environment (the Kubernetes Secret), so it is not checked here.
    args = {**profile.args, "host": profile.http_host}
    settings = Settings.model_validate({**args, "model_repository": model_repository, "allow_anonymous": True})
    ingress, models = serve_deployments(settings)
    deployments = [_apply(_options(ingress), profile.ingress)]
    deployments += [_apply(_options(model), profile.models) for model in models.values()]
    config = {
        "proxy_location": profile.proxy_location,
        # Same proxy deadline as `python -m service`: a little over the gateway's own request timeout.
        "http_options": {
            "host": profile.http_host,
            "port": profile.http_port,
            "request_timeout_s": settings.request_timeout_s + 5,
        },
        "applications": [
            {
                "name": profile.name,
                "route_prefix": profile.route_prefix,
                "import_path": IMPORT_PATH,
                # `host` is where Serve's proxies listen (http_options): a network address makes the
                # gateway refuse to start without CVSERVE_API_KEY, on the cluster, as `python -m service` does.
                "args": args,
                "deployments": deployments,
            }
        ],
    }
    ServeDeploySchema.model_validate(config)  # Ray's own validation, as `serve deploy` does
    return config


def _options(deployment: Deployment) -> dict[str, Any]:
    """A deployment's options as a Serve config writes them (only what the code set)."""
    return deployment_to_schema(deployment).model_dump(exclude_unset=True, mode="json")


def _apply(options: dict[str, Any], scaling: Scaling) -> dict[str, Any]:
    if scaling.autoscaling is not None:
        options.pop("num_replicas", None)
        options["autoscaling_config"] = scaling.autoscaling.as_config()
    if scaling.resources:
        # A config's ray_actor_options replace the code's as a whole: keep the code's and add resources.
        actor_options = dict(options.get("ray_actor_options", {}))
        actor_options["resources"] = {**actor_options.get("resources", {}), **scaling.resources}
        options["ray_actor_options"] = actor_options
    return options


def render(config: Mapping[str, Any], profile: Profile) -> str:
    """The YAML text of a generated config, with a header saying where it comes from."""
    header = (
        f"# Serve config: {profile.description}.\n"
        "# Generated from service/app.py by `python -m service.deploy.serve_config write`; edit the profile in\n"
        "# service/deploy/serve_config.py, not this file. Deploy: serve deploy <this file> -a http://<head>:8265\n"
    )
    return header + yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def embed_in_rayservice(manifest: str, config_text: str) -> str:
    """Replace the `serveConfigV2: |` block of a RayService manifest with `config_text`."""
    match = re.search(r"^(?P<indent> *)serveConfigV2: \|\n(?P<body>(?:(?P=indent) {2}.*\n|\n)*)", manifest, re.MULTILINE)
    if match is None:
        raise ValueError("no `serveConfigV2: |` block in the RayService manifest")
    indent = match["indent"] + "  "
    body = "".join(f"{indent}{line}\n" if line else "\n" for line in _strip_comments(config_text).splitlines())
    return manifest[: match.start("body")] + body + manifest[match.end("body") :]


def _strip_comments(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    """`write` regenerates the Serve configs and the RayService copy; `check` reports drift (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    parser.add_argument(
        "--model-repository", type=Path, default=None, help="exported models to build against (default: ROOT/model_repository)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model_repository = args.model_repository or args.root / "model_repository"
    expected: dict[Path, str] = {}
    for path, profile in PROFILES.items():
        expected[path] = render(build_config(profile, model_repository), profile)
    rayservice = (args.root / RAYSERVICE_PATH).read_text()
    expected[RAYSERVICE_PATH] = embed_in_rayservice(rayservice, expected[Path("deploy/serve/cvserve-triton.yaml")])

    stale = [path for path, text in expected.items() if not (args.root / path).is_file() or (args.root / path).read_text() != text]
    if args.command == "check":
        for path in stale:
            log.error("%s does not match the application code: run `python -m service.deploy.serve_config write`", path)
        return 1 if stale else 0
    for path in stale:
        (args.root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.root / path).write_text(expected[path])
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
