"""Video files through the task routes (POST /detect with a video body), in process over the real models."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.video.clips import (
    Clip,
    decode_video,
    dominant_share,
    encode_video,
    matched_tracks,
    one_big_shape,
    without_decoder,
)
from tests.video.conftest import KEY, Gateway

MIN_TRACKED_SHARE = 0.9
CONTAINERS = ("webm", "mp4")


@pytest.fixture(scope="module")
def videos(clip: Clip) -> dict[str, bytes]:
    """The two-shape clip as WebM (VP8) and MP4 (H.264), 10 frames/s."""
    return {container: encode_video(clip.frames, container) for container in CONTAINERS}


def post_video(client: TestClient, path: str, data: bytes, container: str, **headers: str):
    return client.post(path, content=data, headers={"Content-Type": f"video/{container}", **headers})


@pytest.mark.parametrize("container", CONTAINERS)
def test_a_video_gets_tracked_detections_for_every_frame(
    detect_client: TestClient, clip: Clip, videos: dict[str, bytes], container: str
) -> None:
    response = post_video(detect_client, "/detect?score_threshold=0.5", videos[container], container)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "detector"
    assert body["video"] == {
        "width": 160, "height": 128, "fps": 10.0, "frames": 30, "duration_s": 3.0,
        "codec": {"webm": "vp8", "mp4": "h264"}[container],
    }  # fmt: skip
    assert [frame["index"] for frame in body["frames"]] == list(range(30))
    assert [frame["time_s"] for frame in body["frames"]] == pytest.approx([i / 10 for i in range(30)])
    detections = [frame["result"]["detections"] for frame in body["frames"]]
    assert all(detections)
    tracks = []
    for index, label in enumerate(clip.labels):
        ids = matched_tracks(detections, clip.boxes[index], label)
        track, share = dominant_share(ids)
        assert share >= MIN_TRACKED_SHARE, f"{label}: {ids}"
        tracks.append(track)
    assert len(set(tracks)) == 2, tracks


@pytest.mark.parametrize("container", CONTAINERS)
def test_the_annotated_video_comes_back_when_asked(
    detect_client: TestClient, clip: Clip, videos: dict[str, bytes], container: str
) -> None:
    response = post_video(detect_client, "/detect", videos[container], container, Accept=f"video/{container}")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == f"video/{container}"
    assert response.headers["x-video-frames"] == "30"
    frames = decode_video(response.content)
    assert len(frames) == 30 and frames[0].shape == clip.frames[0].shape
    # the circle's box is drawn around it: the outline's left edge differs clearly from the frame sent
    for index in (5, 15, 25):
        x0, y0, _, y1 = (round(float(v)) for v in clip.boxes[0][index])
        column = slice(max(0, x0 - 3), x0 + 1)
        edge = np.abs(
            frames[index][y0:y1, column].astype(int) - clip.frames[index][y0:y1, column].astype(int)
        )
        assert edge.mean() > 25, (index, edge.mean())


def test_classify_and_segment_answer_every_frame_of_a_video(detect_client: TestClient) -> None:
    clip = one_big_shape(8)
    data = encode_video(clip.frames, "webm")
    classes = post_video(detect_client, "/classify?top_k=1", data, "webm")
    assert classes.status_code == 200, classes.text
    labels = [frame["result"]["predictions"][0]["label"] for frame in classes.json()["frames"]]
    assert len(labels) == 8 and labels.count("circle") >= 7, labels
    segments = post_video(detect_client, "/segment", data, "webm")
    assert segments.status_code == 200, segments.text
    fractions = [frame["result"]["class_fractions"].get("circle", 0.0) for frame in segments.json()["frames"]]
    assert len(fractions) == 8 and min(fractions) > 0.15, fractions


@pytest.mark.parametrize(
    ("settings", "status", "code"),
    [
        ({"video_max_frames": 20}, 413, "too_many_frames"),
        ({"video_max_duration_s": 2.0}, 413, "video_too_long"),
        ({"video_max_frame_pixels": 160 * 100}, 413, "frame_too_large"),
        ({"video_max_bytes": 4096}, 413, "body_too_large"),
    ],
)
@pytest.mark.parametrize("container", CONTAINERS)
def test_video_limits_give_their_4xx(
    gateway: Gateway, videos: dict[str, bytes], settings: dict, status: int, code: str, container: str
) -> None:
    with gateway(**settings) as client:
        response = post_video(client, "/detect", videos[container], container)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        small = encode_video(one_big_shape(4, size=96).frames, container)  # within every limit: answered
        assert post_video(client, "/detect", small, container).status_code == 200


def test_bad_videos_are_4xx_with_their_code(detect_client: TestClient, videos: dict[str, bytes]) -> None:
    cases = [
        ("video/mp4", b"not a video at all" * 50, 400, "undecodable_video"),
        ("video/mp4", b"", 400, "undecodable_video"),
        ("video/mp4", videos["webm"], 400, "undecodable_video"),  # the demuxer follows the Content-Type
        (
            "video/mp4",
            videos["mp4"][: len(videos["mp4"]) // 2],
            400,
            "undecodable_video",
        ),  # cut before its index
        ("video/x-msvideo", videos["mp4"], 415, "unsupported_media_type"),
    ]
    for content_type, data, status, code in cases:
        response = detect_client.post("/detect", content=data, headers={"Content-Type": content_type})
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
            content_type,
            response.text,
        )
    annotated = detect_client.post(
        "/detect?annotate=png", content=videos["webm"], headers={"Content-Type": "video/webm"}
    )
    assert annotated.status_code == 422 and "Accept: video/webm" in annotated.json()["error"]["message"]


@pytest.mark.parametrize("container", CONTAINERS)
def test_a_video_codec_without_a_decoder_is_415(
    detect_client: TestClient, videos: dict[str, bytes], container: str
) -> None:
    """FFmpeg finds the video stream but has no decoder for its codec (PyAV: `codec_context` is None)."""
    data = without_decoder(videos[container], container)
    for accept in ("application/json", f"video/{container}"):
        response = post_video(detect_client, "/detect", data, container, Accept=accept)
        assert response.status_code == 415, response.text
        error = response.json()["error"]
        assert error["code"] == "unsupported_media_type" and "H.264, VP8" in error["message"], error
    assert post_video(detect_client, "/detect", videos[container], container).status_code == 200


def test_a_cut_webm_answers_the_frames_it_has(detect_client: TestClient, videos: dict[str, bytes]) -> None:
    cut = videos["webm"][: len(videos["webm"]) * 2 // 3]  # WebM streams: the frames before the cut decode
    response = post_video(detect_client, "/detect", cut, "webm")
    assert response.status_code == 200, response.text
    assert 5 <= response.json()["video"]["frames"] < 30


def test_a_video_needs_the_api_key_when_one_is_set(gateway: Gateway, videos: dict[str, bytes]) -> None:
    with gateway(api_key=KEY) as client:
        refused = post_video(client, "/detect", videos["webm"], "webm")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        answered = post_video(client, "/detect", videos["webm"], "webm", **{"X-API-Key": KEY})
        assert answered.status_code == 200 and answered.json()["video"]["frames"] == 30


def test_openapi_lists_the_video_bodies(detect_client: TestClient) -> None:
    spec = detect_client.get("/openapi.json").json()
    for endpoint in ("/classify", "/detect", "/segment"):
        assert {"video/mp4", "video/webm"} <= set(spec["paths"][endpoint]["post"]["requestBody"]["content"])


def test_a_video_answer_says_where_its_time_went(
    detect_client: TestClient, gateway: Gateway, videos: dict[str, bytes]
) -> None:
    from tests.service.telemetry.test_stage_timings import parse

    response = post_video(detect_client, "/detect", videos["webm"], "webm")
    assert response.status_code == 200, response.text[:300]
    durations, _ = parse(response.headers["server-timing"])
    stages = ("read", "decode", "preprocess", "model", "postprocess", "encode")
    assert list(durations) == [*stages, "total"] and all(durations[s] > 0 for s in stages), durations
    assert (
        sum(durations[s] for s in stages) <= durations["total"] * 1.01 + 0.5
    )  # sequential stages of one request
    drawn = post_video(detect_client, "/detect", videos["webm"], "webm", Accept="video/webm")
    assert drawn.status_code == 200 and "encode;dur=" in drawn.headers["server-timing"]
    with gateway(stage_timings=False) as quiet:
        assert "server-timing" not in post_video(quiet, "/detect", videos["webm"], "webm").headers
