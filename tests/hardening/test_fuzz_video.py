"""Fuzzing video files through POST /detect: small MP4 and WebM files of several codecs (H.264, MPEG-4 Part 2,
VP8, VP9, and a codec FFmpeg has no decoder for), mutated byte by byte, with every video Content-Type and
Accept (JSON or the annotated video). Every answer is a 2xx or a documented 4xx JSON error, and a good video
is answered afterwards. The real detector under uvicorn; fixed example count and the committed replay
database (tests/hardening/fuzzing.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from fractions import Fraction

import av
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hardening.fuzzing import fuzz_settings, mutated
from tests.video.clips import moving_shapes, without_decoder

CODECS = (("webm", "libvpx"), ("webm", "libvpx-vp9"), ("mp4", "libx264"), ("mp4", "mpeg4"))
CONTENT_TYPES = [
    "video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/avi", "video/mp4; a=b",
    "image/png",
]  # fmt: skip
ACCEPT = [None, "application/json", "video/webm", "video/mp4", "video/webm;q=0, application/msgpack"]
QUERIES = ["", "?score_threshold=0.5", "?max_detections=1", "?annotate=png", "?score_threshold=2"]


def small_video(container: str, codec: str, frames: int = 4) -> bytes:
    """`frames` frames of 64×48 moving shapes in `container` with `codec`."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for image in moving_shapes(frames, width=64, height=48).frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


VIDEOS = {(container, codec): small_video(container, codec) for container, codec in CODECS}
SEEDS = [  # (container, file)
    *((container, data) for (container, _), data in VIDEOS.items()),
    ("mp4", without_decoder(VIDEOS["mp4", "libx264"], "mp4")),
    ("webm", without_decoder(VIDEOS["webm", "libvpx"], "webm")),
]


@st.composite
def videos(draw: st.DrawFn) -> tuple[bytes, str]:
    """A seed file with a few bytes changed (or none), and mostly the Content-Type of its container."""
    container, data = draw(st.sampled_from(SEEDS))
    changed = draw(st.one_of(st.just(data), mutated([data], max_edits=4, random_share=20)))
    own = f"video/{container}"
    content_type = draw(st.one_of(st.just(own), st.just(own), st.sampled_from(CONTENT_TYPES)))
    return changed, content_type


@pytest.fixture(scope="module")
def video_client(inprocess_gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{inprocess_gateway}", timeout=120) as client:
        yield client


def test_mutated_videos_get_no_5xx_and_the_server_answers_after(video_client: httpx.Client) -> None:
    seen: dict[int, int] = {}

    @fuzz_settings(max_examples=60)
    @given(
        video=videos(),
        accept=st.sampled_from(ACCEPT),
        query=st.sampled_from(QUERIES),
    )
    def one_video(video: tuple[bytes, str], accept: str | None, query: str) -> None:
        data, content_type = video
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
        response = video_client.post("/detect" + query, content=data, headers=headers)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:300]

    one_video()
    print(f"video fuzz: statuses {dict(sorted(seen.items()))}")
    for (container, _), data in VIDEOS.items():
        response = video_client.post("/detect", content=data, headers={"Content-Type": f"video/{container}"})
        assert response.status_code == 200, response.text[:300]
        assert response.json()["video"]["frames"] == 4
