"""Streams and video files through the session's real gateway: HAProxy → Ray Serve replica → embedded models."""

from __future__ import annotations

import json
import re

import httpx
import psutil
from websockets.sync.client import connect

from support.waiting import wait_for
from tests.video.clips import dominant_share, encode_video, jpeg, matched_tracks, moving_shapes

MIN_TRACKED_SHARE = 0.9


def ws_url(http_url: str) -> str:
    return "ws://" + http_url.removeprefix("http://")


def listener_names(port: int) -> set[str]:
    """Names of the processes listening on `port`."""
    listening = psutil.net_connections("tcp")
    return {
        psutil.Process(c.pid).name()
        for c in listening
        if c.laddr.port == port and c.status == "LISTEN" and c.pid
    }


def test_a_stream_through_haproxy_and_serve_is_answered_and_tracked(embedded_gateway: str) -> None:
    port = int(embedded_gateway.removeprefix("http://").split("/")[0].split(":")[1])
    assert listener_names(port) == {"haproxy"}  # the WebSocket passes through Serve's HAProxy ingress
    clip = moving_shapes(30)
    answers = []
    with connect(ws_url(embedded_gateway) + "/stream/detect", open_timeout=30, max_size=None) as ws:
        assert json.loads(ws.recv(30))["type"] == "ready"
        for frame in clip.frames:
            ws.send(jpeg(frame))
            answers.append(json.loads(ws.recv(30)))
    assert [a["frame"] for a in answers] == list(range(30)), answers[-1]
    detections = [a["result"]["detections"] for a in answers]
    for index, label in enumerate(clip.labels):
        ids = matched_tracks(detections, clip.boxes[index], label)
        assert dominant_share(ids)[1] >= MIN_TRACKED_SHARE, f"{label}: {ids}"


def test_dropped_frames_reach_prometheus(embedded_gateway: str, ray_metrics_port: int) -> None:
    frames = [jpeg(frame) for frame in moving_shapes(10, width=640, height=480).frames]
    with connect(ws_url(embedded_gateway) + "/stream/detect", open_timeout=30, max_size=None) as ws:
        assert json.loads(ws.recv(30))["type"] == "ready"
        for index in range(150):  # far faster than the model answers
            ws.send(frames[index % len(frames)])
        answer = json.loads(ws.recv(30))
        while answer["frame"] != 149:
            answer = json.loads(ws.recv(30))
    dropped = answer["stats"]["dropped_stale"] + answer["stats"]["dropped_rate"]
    assert dropped > 0, answer["stats"]
    url = f"http://127.0.0.1:{ray_metrics_port}/metrics"

    def exported_drops() -> float:
        text = httpx.get(url, timeout=5).text
        found = re.findall(
            r'ray_cvserve_stream_dropped_frames_total\{[^}]*endpoint="/detect"[^}]*\} (\S+)', text
        )
        return sum(float(value) for value in found)

    wait_for(
        lambda: exported_drops() >= dropped,
        60,
        f"{dropped} dropped frames never reached {url}",
        interval_s=1.0,
    )


def test_a_video_file_through_the_gateway(embedded_gateway: str) -> None:
    clip = moving_shapes(20)
    response = httpx.post(
        embedded_gateway + "/detect",
        content=encode_video(clip.frames, "webm"),
        headers={"Content-Type": "video/webm"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["video"]["frames"] == 20 and all(f["result"]["detections"] for f in body["frames"])
