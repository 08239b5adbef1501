"""Locust users for /classify, /detect and /segment with a mix of shapes images (JPEG and PNG).

Headless run with a bounded run time and CSV + HTML reports (see loadtests/README section):

    .venv/bin/python -m locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 8 -r 4 --run-time 60s --csv loadtests/out/locust --html loadtests/out/locust.html

Task weights and the image mix are custom arguments (or LOCUST_* environment variables).
Any failed request makes Locust exit non-zero.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable

from locust import HttpUser, between, events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

from loadtests.images import DEFAULT_SIZES, EncodedImage, make_image_mix, parse_sizes

DEFAULT_WEIGHTS = {"classify": 3, "detect": 2, "segment": 1}
UPLOAD_STYLES = ("mixed", "multipart", "raw")

_images: list[EncodedImage] = []


@events.init_command_line_parser.add_listener
def add_arguments(parser: LocustArgumentParser) -> None:
    """Declare the custom arguments: task weights, wait times and the image mix."""
    group = parser.add_argument_group("cvserve")
    for endpoint, weight in DEFAULT_WEIGHTS.items():
        group.add_argument(
            f"--{endpoint}-weight",
            type=int,
            default=weight,
            env_var=f"LOCUST_{endpoint.upper()}_WEIGHT",
            help=f"relative weight of POST /{endpoint} (0 leaves it out; default {weight})",
        )
    group.add_argument(
        "--wait-min",
        type=float,
        default=0.1,
        env_var="LOCUST_WAIT_MIN",
        help="shortest think time between a user's requests, seconds",
    )
    group.add_argument(
        "--wait-max",
        type=float,
        default=1.0,
        env_var="LOCUST_WAIT_MAX",
        help="longest think time between a user's requests, seconds",
    )
    group.add_argument(
        "--upload",
        choices=UPLOAD_STYLES,
        default="mixed",
        env_var="LOCUST_UPLOAD",
        help="send images as multipart field `file`, as a raw body, or alternate (default)",
    )
    group.add_argument(
        "--image-count",
        type=int,
        default=16,
        env_var="LOCUST_IMAGE_COUNT",
        help="distinct images generated at start, cycling sizes and JPEG/PNG",
    )
    group.add_argument(
        "--image-sizes",
        default=",".join(f"{w}x{h}" for w, h in DEFAULT_SIZES),
        env_var="LOCUST_IMAGE_SIZES",
        help="comma-separated WIDTHxHEIGHT list",
    )


def _endpoint_task(endpoint: str) -> Callable[[CvserveUser], None]:
    def run(user: CvserveUser) -> None:
        user.post_image(endpoint)

    run.__name__ = endpoint
    return run


@events.init.add_listener
def configure(environment: Environment, **_: object) -> None:
    """Generate the images once and set the users' task mix and think time from the arguments."""
    options = environment.parsed_options
    if options is None:  # started through the library API without a parser: keep the defaults
        return
    weights = {endpoint: getattr(options, f"{endpoint}_weight") for endpoint in DEFAULT_WEIGHTS}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"task weights must be >= 0 and not all 0, got {weights}")
    if not 0 <= options.wait_min <= options.wait_max:
        raise ValueError("need 0 <= --wait-min <= --wait-max")
    CvserveUser.tasks = [_endpoint_task(e) for e, w in weights.items() for _ in range(w)]
    CvserveUser.wait_time = between(options.wait_min, options.wait_max)
    CvserveUser.upload = options.upload
    _images[:] = make_image_mix(options.image_count, parse_sizes(options.image_sizes))


def _result_count(text: str) -> int:
    """How many per-image results a JSON answer holds (-1 if it is not such an answer)."""
    try:
        body = json.loads(text)
    except ValueError:
        return -1
    results = body.get("results") if isinstance(body, dict) else None
    return len(results) if isinstance(results, list) else -1


class CvserveUser(HttpUser):
    """A client that uploads one image at a time to a random endpoint, weighted by task mix."""

    wait_time = between(0.1, 1.0)
    upload = "mixed"
    tasks = [_endpoint_task(e) for e, w in DEFAULT_WEIGHTS.items() for _ in range(w)]  # noqa: RUF012 (Locust's API)

    def on_start(self) -> None:
        if not _images:
            _images[:] = make_image_mix(16)
        start = random.randrange(len(_images))
        self._images = itertools.islice(itertools.cycle(_images), start, None)

    def _body(self, image: EncodedImage) -> dict[str, object]:
        """Keyword arguments for a multipart or a raw-body upload, as `upload` says."""
        multipart = self.upload == "multipart" or (self.upload == "mixed" and random.random() < 0.5)
        if multipart:
            return {"files": {"file": (image.name, image.data, image.content_type)}}
        return {"data": image.data, "headers": {"Content-Type": image.content_type}}

    def post_image(self, endpoint: str) -> None:
        """Upload the next image; anything but HTTP 200 with one result fails."""
        image = next(self._images)
        with self.client.post(
            f"/{endpoint}", name=f"/{endpoint}", catch_response=True, **self._body(image)
        ) as response:
            if response.status_code != 200:
                response.failure(f"{image.name}: HTTP {response.status_code}: {response.text[:200]}")
            elif _result_count(response.text) != 1:
                response.failure(
                    f"{image.name}: body is not an answer with one result: {response.text[:200]}"
                )
