"""The demo page's live mode in a real headless Chromium: its fake camera (fed a generated clip of moving
shapes) and a chosen video file stream to the session gateway (HAProxy, Serve, embedded models) over a
WebSocket; the answers come back tracked and are drawn over the picture."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import CHROMIUM_FLAGS
from tests.video.clips import encode_video, moving_shapes

WIDTH, HEIGHT = 320, 256
ANSWERS = 30  # answers to wait for before judging
MIN_TRACKED_SHARE = 0.9


def ping_pong_frames() -> list[np.ndarray]:
    """The two shapes gliding across and back: a loop without jumps, so tracks stay continuous."""
    frames = moving_shapes(60, width=WIDTH, height=HEIGHT, seed=11).frames
    return frames + frames[-2:0:-1]


def write_y4m(frames: list[np.ndarray], path: Path) -> None:
    """The frames as a YUV4MPEG2 file, what Chromium's fake camera plays (in a loop)."""
    with av.open(str(path), "w", format="yuv4mpegpipe") as output:
        stream = output.add_stream("rawvideo", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("live")
    frames = ping_pong_frames()
    camera, video = folder / "camera.y4m", folder / "shapes.webm"
    write_y4m(frames, camera)
    video.write_bytes(encode_video(frames, "webm", fps=30))
    return {"camera": camera, "video": video}


@pytest.fixture(scope="module")
def camera_browser(clips: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """A headless Chromium whose camera is a fake device playing the generated clip, allowed without asking."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("chromium/chromedriver not found: run `make system-deps`")
    options = Options()
    options.binary_location = chromium
    for flag in (
        *CHROMIUM_FLAGS,
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={clips['camera']}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-live-profile')}")
    service = Service(executable_path=chromedriver, log_output=str(tmp_path_factory.mktemp("driver") / "log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def live_state(browser: WebDriver) -> dict:
    return browser.execute_script("return window.cvserveLive")


def live_labels(browser: WebDriver) -> list[str]:
    """The labels listed under the live picture, read at once (the list is rebuilt with every answer)."""
    script = "return Array.from(document.querySelectorAll('#live-labels li'), (li) => li.textContent)"
    return browser.execute_script(script)


def open_detect(browser: WebDriver, gateway: str) -> None:
    browser.get(gateway + "/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live"))
    browser.find_element(By.XPATH, "//input[@name='task' and @value='detect']/..").click()


def wait_for_answers(browser: WebDriver) -> dict:
    def enough(driver: WebDriver) -> bool:
        state = live_state(driver)
        assert state["state"] != "error", (
            state["state"],
            state["closed"],
            driver.find_element(By.ID, "live-status").text,
        )
        return state["answered"] >= ANSWERS

    WebDriverWait(browser, 90, poll_frequency=0.25).until(enough)
    return live_state(browser)


def assert_tracked(state: dict) -> None:
    """Both shapes found in nearly every answer, each under one track id nearly always."""
    history = state["history"]
    for label in ("circle", "square"):
        ids = [
            next((d["track_id"] for d in a["result"]["detections"] if d["label"] == label), "missed")
            for a in history
        ]
        _, count = Counter(i for i in ids if i not in (None, "missed")).most_common(1)[0]
        assert count / len(ids) >= MIN_TRACKED_SHARE, f"{label}: {ids}"


def overlay_is_drawn(browser: WebDriver) -> bool:
    painted = browser.execute_script(
        "const c = document.getElementById('live-overlay');"
        "const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < data.length; i += 4) n += data[i] > 0; return [c.width, c.height, n];"
    )
    width, height, opaque = painted
    return (width, height) == (WIDTH, HEIGHT) and opaque > 500  # box outlines and label chips


def test_the_fake_camera_streams_and_comes_back_tracked(
    camera_browser: WebDriver, embedded_gateway: str, artifacts_dir: Path
) -> None:
    open_detect(camera_browser, embedded_gateway)
    camera_browser.find_element(By.ID, "live-camera").click()
    state = wait_for_answers(camera_browser)
    camera_browser.save_screenshot(str(artifacts_dir / "live-camera.png"))
    assert state["task"] == "detect" and not state["errors"], state["errors"]
    assert_tracked(state)
    assert overlay_is_drawn(camera_browser)
    labels = live_labels(camera_browser)
    assert any(text.startswith("circle #") for text in labels) and any(
        text.startswith("square #") for text in labels
    )
    camera_browser.find_element(By.ID, "live-stop").click()
    assert live_state(camera_browser)["state"] == "stopped"


def test_a_chosen_video_file_streams_and_comes_back_tracked(
    camera_browser: WebDriver, embedded_gateway: str, clips: dict[str, Path], artifacts_dir: Path
) -> None:
    open_detect(camera_browser, embedded_gateway)
    camera_browser.find_element(By.ID, "live-file").send_keys(str(clips["video"]))
    state = wait_for_answers(camera_browser)
    camera_browser.save_screenshot(str(artifacts_dir / "live-video-file.png"))
    assert not state["errors"], state["errors"]
    assert_tracked(state)
    assert overlay_is_drawn(camera_browser)
    camera_browser.find_element(By.ID, "live-stop").click()


def test_segment_and_classify_streams_draw_their_answers(
    camera_browser: WebDriver, embedded_gateway: str
) -> None:
    camera_browser.get(embedded_gateway + "/")
    for task in ("segment", "classify"):
        camera_browser.find_element(By.XPATH, f"//input[@name='task' and @value='{task}']/..").click()
        camera_browser.find_element(By.ID, "live-camera").click()
        WebDriverWait(camera_browser, 60, poll_frequency=0.25).until(
            lambda d, task=task: live_state(d).get("task") == task and live_state(d)["answered"] >= 5
        )
        state = live_state(camera_browser)
        assert state["task"] == task and not state["errors"], state["errors"]
        labels = live_labels(camera_browser)
        if task == "segment":  # the drawn mask covers the picture; both shapes are listed
            assert overlay_is_drawn(camera_browser)
            assert any(t.startswith("circle") for t in labels) and any(
                t.startswith("square") for t in labels
            ), labels
        else:
            assert len(labels) == 5, labels  # top-5 classes of the frame
        camera_browser.find_element(By.ID, "live-stop").click()
