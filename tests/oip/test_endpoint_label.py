"""The Open Inference Protocol's paths get bounded metric tags of their own (not `other`)."""

from __future__ import annotations

import pytest

from service.app import endpoint_tag
from service.telemetry.asgi import route_path
from service.handlers import HANDLERS


@pytest.mark.parametrize(
    ("path", "tag"),
    [
        ("/v2/models/detector/infer", "/v2/models/detector/infer"),
        ("/v2/models/segmenter/versions/1/infer", "/v2/models/segmenter/infer"),
        ("/v2/models/detector", "/v2"),
        ("/v2/health/ready", "/v2"),
        ("/v2", "/v2"),
        ("/v2/models/nope/infer", "/v2"),  # unknown names do not grow the tag set
        ("/v2/models/detector/versions/1/2/infer", "/v2"),
        ("/v2x/models/detector/infer", "other"),
        ("/detect", "/detect"),
        ("/detect/", "/detect"),
        ("/nothing", "other"),
    ],
)
def test_oip_paths_are_tagged(path: str, tag: str) -> None:
    assert endpoint_tag(route_path({"path": path}), HANDLERS) == tag
    assert endpoint_tag(route_path({"path": "/gw" + path, "root_path": "/gw"}), HANDLERS) == tag  # behind a route prefix
