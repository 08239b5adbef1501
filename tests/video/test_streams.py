"""WebSocket frame streams in process (Starlette's TestClient over create_api and the real TorchScript models)."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from tests.video.clips import Clip, dominant_share, jpeg, matched_tracks, moving_shapes, one_big_shape
from tests.video.conftest import KEY, Gateway

MIN_TRACKED_SHARE = 0.9  # frames in which a moving shape carries its one track id


def receive_answer(ws: WebSocketTestSession) -> dict:
    """The next result or error message (skipping nothing: every message is one of the two)."""
    message = ws.receive_json()
    assert message["type"] in ("result", "error"), message
    return message


def run_lock_step(ws: WebSocketTestSession, frames: list[np.ndarray]) -> list[dict]:
    """Send each frame and wait for its answer before the next one (no frame is dropped)."""
    ready = ws.receive_json()
    assert ready["type"] == "ready", ready
    answers = []
    for index, frame in enumerate(frames):
        ws.send_bytes(jpeg(frame))
        answer = receive_answer(ws)
        assert answer["type"] == "result" and answer["frame"] == index, answer
        answers.append(answer)
    return answers


def assert_tracked(clip: Clip, answers: list[dict], frame_indices: list[int]) -> None:
    """Every shape is found in the frames and keeps one track id in MIN_TRACKED_SHARE of them; ids differ."""
    detections = [answer["result"]["detections"] for answer in answers]
    assert all(detections), "a frame with two shapes came back without detections"
    dominant = []
    for index, label in enumerate(clip.labels):
        truth = [clip.boxes[index][i] for i in frame_indices]
        ids = matched_tracks(detections, truth, label)
        track, share = dominant_share(ids)
        assert share >= MIN_TRACKED_SHARE, f"{label}: track ids per frame {ids}"
        dominant.append(track)
    assert len(set(dominant)) == len(dominant), f"two shapes share a track id: {dominant}"


def test_each_moving_shape_keeps_one_track_id(detect_client: TestClient, clip: Clip) -> None:
    with detect_client.websocket_connect("/stream/detect") as ws:
        answers = run_lock_step(ws, clip.frames)
    assert_tracked(clip, answers, list(range(len(clip.frames))))
    assert answers[-1]["stats"] == {
        "received": 30, "answered": 30, "dropped_stale": 0, "dropped_rate": 0, "errors": 0,
    }  # fmt: skip


def test_tracks_hold_when_only_every_third_frame_arrives(detect_client: TestClient) -> None:
    clip = moving_shapes(60, seed=3)
    kept = list(range(0, 60, 3))  # as a stream that dropped two frames in three sees it: larger jumps
    with detect_client.websocket_connect("/stream/detect") as ws:
        answers = run_lock_step(ws, [clip.frames[i] for i in kept])
    assert_tracked(clip, answers, kept)


def test_without_tracking_detections_carry_no_track_ids(detect_client: TestClient, clip: Clip) -> None:
    with detect_client.websocket_connect("/stream/detect?track=false") as ws:
        answers = run_lock_step(ws, clip.frames[:3])
    found = [d for answer in answers for d in answer["result"]["detections"]]
    assert found and all("track_id" not in d for d in found)


def test_answers_carry_the_annotated_frame_when_asked(detect_client: TestClient, clip: Clip) -> None:
    with detect_client.websocket_connect("/stream/detect?annotate=png") as ws:
        answers = run_lock_step(ws, clip.frames[:2])
    url = answers[1]["annotated_image"]
    assert url.startswith("data:image/png;base64,")
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB"))
    assert drawn.shape == clip.frames[1].shape
    x0, y0, _, y1 = (round(v) for v in answers[1]["result"]["detections"][0]["box"])
    # the box outline is drawn: its left edge differs clearly from the frame sent
    edge = np.abs(drawn[y0:y1, x0 : x0 + 2].astype(int) - clip.frames[1][y0:y1, x0 : x0 + 2].astype(int))
    assert edge.mean() > 30, edge.mean()


def test_classify_and_segment_streams_answer_each_frame(detect_client: TestClient) -> None:
    clip = one_big_shape(6)
    with detect_client.websocket_connect("/stream/classify?top_k=1") as ws:
        answers = run_lock_step(ws, clip.frames)
    labels = [answer["result"]["predictions"][0]["label"] for answer in answers]
    assert labels.count("circle") >= 5, labels
    with detect_client.websocket_connect("/stream/segment") as ws:
        answers = run_lock_step(ws, clip.frames)
    assert all(
        any(s["label"] == "circle" and s["pixel_fraction"] > 0.02 for s in answer["result"]["segments"])
        for answer in answers
    ), [answer["result"]["segments"] for answer in answers]


def test_a_flooding_client_gets_the_latest_frames_and_drop_counts(gateway: Gateway, clip: Clip) -> None:
    sent = 240
    with gateway(stream_max_fps=1000.0) as client:
        with client.websocket_connect("/stream/detect") as ws:
            assert ws.receive_json()["type"] == "ready"
            frames = [jpeg(frame) for frame in clip.frames]
            for index in range(sent):  # never waits for an answer
                ws.send_bytes(frames[index % len(frames)])
            answers = []
            while not answers or answers[-1]["frame"] != sent - 1:  # the last frame sent is always answered
                answers.append(receive_answer(ws))
        stats = answers[-1]["stats"]
        dropped = client.app.state.answerer.metrics.dropped
    assert all(answer["type"] == "result" for answer in answers)
    assert stats["received"] == sent
    assert stats["dropped_stale"] > 0 and stats["answered"] < sent, stats
    assert stats["answered"] + stats["dropped_stale"] + stats["dropped_rate"] + stats["errors"] == sent, stats
    assert [answer["frame"] for answer in answers] == sorted({answer["frame"] for answer in answers})
    assert dropped["/detect", "stale"] == stats["dropped_stale"]  # what cvserve_stream_dropped_frames counts


def test_the_rate_cap_spaces_answers_and_drops_what_comes_between(gateway: Gateway, clip: Clip) -> None:
    max_fps, sent = 5.0, 40
    with gateway(stream_max_fps=max_fps) as client, client.websocket_connect("/stream/detect") as ws:
        assert ws.receive_json()["type"] == "ready"
        began = time.monotonic()
        for index in range(sent):  # 20 frames a second for 2 s
            ws.send_bytes(jpeg(clip.frames[index % 30]))
            time.sleep(0.05)
        answers = [receive_answer(ws)]
        while answers[-1]["frame"] != sent - 1:  # the last frame sent is always answered
            answers.append(receive_answer(ws))
        elapsed = time.monotonic() - began
    stats = answers[-1]["stats"]
    assert (
        stats["dropped_rate"] > 0
        and stats["answered"] + stats["dropped_rate"] + stats["dropped_stale"] == sent
    )
    assert stats["answered"] <= max_fps * elapsed + 1, (stats, elapsed)
    assert stats["answered"] >= max_fps * elapsed * 0.6, (stats, elapsed)  # the cap lets its rate through


def test_a_lock_step_client_past_the_cap_is_slowed_not_starved(gateway: Gateway, clip: Clip) -> None:
    max_fps = 10.0
    with gateway(stream_max_fps=max_fps) as client, client.websocket_connect("/stream/detect") as ws:
        began = time.monotonic()
        answers = run_lock_step(ws, clip.frames[:12])  # the model alone would answer at ~40 frames/s
        elapsed = time.monotonic() - began
    assert answers[-1]["stats"]["dropped_rate"] == 0
    assert elapsed >= 11 / max_fps * 0.95, elapsed


def test_streams_past_the_limit_are_closed_with_1013(gateway: Gateway) -> None:
    with gateway(stream_max_streams=1) as client:
        with client.websocket_connect("/stream/detect") as first:
            assert first.receive_json()["type"] == "ready"
            with (
                client.websocket_connect("/stream/detect") as second,
                pytest.raises(WebSocketDisconnect) as closed,
            ):
                second.receive_json()
            assert closed.value.code == 1013 and closed.value.reason.startswith("too_many_streams"), (
                closed.value
            )
        with client.websocket_connect("/stream/detect") as again:  # the first one's place is free again
            assert again.receive_json()["type"] == "ready"


def closed_with(client: TestClient, url: str, **kwargs: object) -> WebSocketDisconnect:
    with client.websocket_connect(url, **kwargs) as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    return closed.value


def test_the_api_key_is_required_when_set(gateway: Gateway, clip: Clip) -> None:
    frame = jpeg(clip.frames[0])
    with gateway(api_key=KEY) as client:
        for refused in (
            closed_with(client, "/stream/detect"),
            closed_with(client, "/stream/detect?api_key=" + "x" * 24),
        ):
            assert refused.code == 4401 and refused.reason.startswith("unauthorized"), refused
        ways = (
            {"url": "/stream/detect", "headers": {"X-API-Key": KEY}},
            {"url": "/stream/detect?api_key=" + KEY},
            {"url": "/stream/detect", "subprotocols": ["cvserve", "cvserve.key." + KEY]},
        )
        for way in ways:
            url = way.pop("url")
            with client.websocket_connect(url, **way) as ws:  # type: ignore[arg-type]
                assert ws.receive_json()["type"] == "ready"
                if "subprotocols" in way:
                    assert ws.accepted_subprotocol == "cvserve"
                ws.send_bytes(frame)
                assert receive_answer(ws)["type"] == "result"


def test_invalid_options_and_disabled_models_close_the_stream(gateway: Gateway) -> None:
    with gateway(models=("detector",)) as client:
        for url in (
            "/stream/detect?score_threshold=2",
            "/stream/detect?verbose=1",
            "/stream/detect?track=perhaps",
        ):
            refused = closed_with(client, url)
            assert refused.code == 4422 and refused.reason.startswith("invalid_request"), (url, refused)
        refused = closed_with(client, "/stream/segment")
        assert refused.code == 4404 and refused.reason.startswith("model_disabled"), refused


def test_a_bad_frame_gets_an_error_answer_and_the_stream_goes_on(gateway: Gateway, clip: Clip) -> None:
    with (
        gateway(stream_max_frame_bytes=64 * 1024) as client,
        client.websocket_connect("/stream/detect") as ws,
    ):
        assert ws.receive_json()["type"] == "ready"
        ws.send_bytes(b"not an image at all")
        assert receive_answer(ws)["error"]["code"] == "undecodable_image"
        ws.send_text("hello")
        assert receive_answer(ws)["error"]["code"] == "bad_request"
        noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        ws.send_bytes(jpeg(noise, quality=100))  # > 64 KiB
        assert receive_answer(ws)["error"]["code"] == "frame_too_large"
        ws.send_bytes(jpeg(clip.frames[0]))
        answer = receive_answer(ws)
        assert answer["type"] == "result" and answer["frame"] == 3 and answer["result"]["detections"]
        assert answer["stats"]["errors"] == 3


def test_frames_of_concurrent_streams_share_model_batches(gateway: Gateway, clip: Clip) -> None:
    streams, failures = 4, []
    with gateway(max_batch_size=8, batch_wait_timeout_s=0.02) as client:

        def one_stream() -> None:
            try:
                with client.websocket_connect("/stream/detect") as ws:
                    assert_tracked(clip, run_lock_step(ws, clip.frames), list(range(len(clip.frames))))
            except BaseException as error:  # noqa: BLE001 - reported by the test below
                failures.append(error)

        threads = [threading.Thread(target=one_stream) for _ in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        sizes = client.app.state.answerer.backend.batch_sizes("detector")
    assert not failures, failures
    assert sum(size * count for size, count in sizes.items()) >= streams * len(clip.frames)
    assert max(sizes) > 1, sizes  # frames from different streams ran through the model together
