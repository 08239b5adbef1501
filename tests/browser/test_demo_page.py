"""The demo page at `/` in a real headless Chromium against the running Serve app.

Each test uploads a freshly generated shapes scene, runs a task, and checks what a person sees:
the labels listed, and an annotated image that differs from the upload where the answer is.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from training.shapes import CLASSES, Scene, make_scene

SEED = 10**6 + 808  # far from the seeds training uses
ANSWER_TIMEOUT_S = 60

_DROP_FILE_JS = """
const [b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
document.getElementById("drop").dispatchEvent(drop);
"""


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Scene, Path]]:
    """A multi-shape scene for detect/segment and a one-shape scene for classify, saved as PNG."""
    folder = tmp_path_factory.mktemp("uploads")
    made = {"many": make_scene(SEED, 256, 2, 3), "one": make_scene(SEED + 1, 256, 1, 1)}
    files = {}
    for name, scene in made.items():
        path = folder / f"shapes-{name}.png"
        path.write_bytes(_png(scene.image))
        files[name] = (scene, path)
    return files


def _state(browser: WebDriver) -> str | None:
    """The page's `data-state` on <body>: idle, running, done or error."""
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _box_edges(picture: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Pixels along a box's bottom and right edges (its own label chip sits on the top edge)."""
    return np.concatenate([picture[y1 - 1, x0 + 2 : x1 - 1], picture[y0 + 2 : y1 - 1, x1 - 1]])


def _open_page(browser: WebDriver, gateway: str) -> None:
    """Open the page as a person types its address (no trailing slash: the gateway redirects)."""
    browser.get(gateway)
    assert browser.current_url.endswith("/"), "no redirect to the trailing-slash URL"
    WebDriverWait(browser, 10).until(lambda d: _state(d) == "idle")


def _run_task(browser: WebDriver, task: str, options: dict[str, str]) -> None:
    """Pick `task`, fill `options` (input id → value), press Run and wait for the answer."""
    browser.find_element(By.XPATH, f"//input[@name='task' and @value='{task}']/..").click()
    for field, value in options.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda d: _state(d) in ("done", "error")
    )


def _shown_image(browser: WebDriver) -> np.ndarray:
    """The annotated image exactly as the page received it, after checking the browser rendered it."""
    image = browser.find_element(By.ID, "result-image")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).convert("RGB"))


def _shown_labels(browser: WebDriver) -> list[str]:
    return [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#labels li")]


def _check_answer(browser: WebDriver, scene: Scene, task: str, artifacts_dir: Path) -> dict:
    """Common checks: no error, image same size as the upload but different, JSON shown; screenshot."""
    browser.save_screenshot(str(artifacts_dir / f"demo-page-{task}.png"))
    assert _state(browser) == "done", browser.find_element(By.ID, "status").text
    shown = _shown_image(browser)
    assert shown.shape == scene.image.shape
    changed = np.any(shown != scene.image, axis=2)
    assert changed.mean() > 0.002, "the annotated image looks like the upload"
    return json.loads(browser.find_element(By.ID, "json").text)


def test_detect_lists_the_drawn_shapes_and_draws_their_boxes(
    browser: WebDriver, embedded_gateway: str, scenes: dict[str, tuple[Scene, Path]], artifacts_dir: Path
) -> None:
    scene, path = scenes["many"]
    _open_page(browser, embedded_gateway)
    browser.find_element(By.ID, "file").send_keys(str(path))
    _run_task(browser, "detect", {"score_threshold": "0.3"})
    body = _check_answer(browser, scene, "detect", artifacts_dir)

    shown = [label.split() for label in _shown_labels(browser)]
    detections = body["results"][0]["detections"]
    assert [name for name, _ in shown] == [d["label"] for d in detections]
    assert np.allclose([float(score) for _, score in shown], [d["score"] for d in detections], atol=0.006)
    assert {CLASSES[c - 1] for c in scene.labels} <= {name for name, _ in shown}
    image = _shown_image(browser)
    for x0, y0, x1, y1 in np.array([d["box"] for d in detections]).reshape(-1, 4).round().astype(int):
        if x1 - x0 < 6 or y1 - y0 < 6:
            continue  # too small to tell an edge from the label chip
        drawn, before = _box_edges(image, x0, y0, x1, y1), _box_edges(scene.image, x0, y0, x1, y1)
        assert np.any(drawn != before, axis=1).mean() > 0.8, "a box edge is not drawn"


def test_segment_by_dropping_a_file_overlays_the_masks(
    browser: WebDriver, embedded_gateway: str, scenes: dict[str, tuple[Scene, Path]], artifacts_dir: Path
) -> None:
    scene, path = scenes["many"]
    _open_page(browser, embedded_gateway)
    browser.execute_script(_DROP_FILE_JS, base64.b64encode(path.read_bytes()).decode(), path.name)
    assert not browser.find_element(By.ID, "run").get_property("disabled")
    _run_task(browser, "segment", {})
    body = _check_answer(browser, scene, "segment", artifacts_dir)

    shown_names = {label.split()[0] for label in _shown_labels(browser)}
    assert shown_names == {s["label"] for s in body["results"][0]["segments"]}
    assert {CLASSES[c - 1] for c in scene.labels} <= shown_names
    image = _shown_image(browser)
    tinted = np.any(image != scene.image, axis=2)
    assert tinted[scene.mask > 0].mean() > 0.8, "the shapes are not overlaid"


def test_classify_shows_the_top_class(
    browser: WebDriver, embedded_gateway: str, scenes: dict[str, tuple[Scene, Path]], artifacts_dir: Path
) -> None:
    scene, path = scenes["one"]
    _open_page(browser, embedded_gateway)
    browser.find_element(By.ID, "file").send_keys(str(path))
    _run_task(browser, "classify", {"top_k": "2"})
    body = _check_answer(browser, scene, "classify", artifacts_dir)

    labels = _shown_labels(browser)
    predictions = body["results"][0]["predictions"]
    assert len(labels) == len(predictions) == 2
    assert labels[0].split()[0] == CLASSES[scene.labels[0] - 1]


def test_a_bad_upload_shows_the_servers_message(
    browser: WebDriver, embedded_gateway: str, tmp_path: Path, artifacts_dir: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    _open_page(browser, embedded_gateway)
    browser.find_element(By.ID, "file").send_keys(str(broken))
    _run_task(browser, "detect", {})
    browser.save_screenshot(str(artifacts_dir / "demo-page-error.png"))

    assert _state(browser) == "error"
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class")
    assert status.text.startswith("detect failed: image 0:")
    assert browser.find_element(By.ID, "result-image").get_attribute("src") is None
