"""The demo page's explanation control in a real headless Chromium, against the app served by uvicorn in a
thread (no Ray): asking for an explanation shows each explained answer's map over the image."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.app import closing, create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.seeds import fresh_seeds
from tests.browser.test_demo_page import _DROP_FILE_JS, _open_page, _png, _run_task, _state
from tests.client.conftest import served
from training.shapes import make_scene


@pytest.fixture(scope="module")
def gateway(model_repository: Path) -> Iterator[str]:
    settings = Settings(model_repository=model_repository, device="cpu", warm_up_batch_sizes=False)
    backend = LocalBackend(settings)
    with served(closing(create_api(settings, backend), backend)) as url:
        yield url


def _overlays(browser: WebDriver) -> list[np.ndarray]:
    shown = []
    for image in browser.find_elements(By.CSS_SELECTOR, "#explain-overlays img"):
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        src = image.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        shown.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).convert("RGB")))
    return shown


@pytest.mark.parametrize(("task", "method", "shapes"), [("classify", "gradcam", 1), ("detect", "occlusion", 2)])
def test_the_page_shows_the_explanation_over_the_image(
    browser: WebDriver, gateway: str, artifacts_dir: Path, task: str, method: str, shapes: int
) -> None:
    (seed,) = fresh_seeds(1, offset=25_000 + shapes)
    print(f"scene seed {seed}")
    scene = make_scene(seed, 192, shapes, shapes)
    _open_page(browser, gateway)
    browser.execute_script(_DROP_FILE_JS, base64.b64encode(_png(scene.image)).decode(), f"{task}.png")
    browser.find_element(By.XPATH, f"//input[@name='task' and @value='{task}']/..").click()
    Select(browser.find_element(By.ID, "explain")).select_by_value(method)
    _run_task(browser, task, {"explain_grid": "6"})
    browser.save_screenshot(str(artifacts_dir / f"demo-page-explain-{task}.png"))
    assert _state(browser) == "done", browser.find_element(By.ID, "status").text
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-overlays img"))
    overlays = _overlays(browser)
    assert overlays and all(o.shape == scene.image.shape for o in overlays)
    assert all(np.any(o != scene.image, axis=2).mean() > 0.05 for o in overlays)  # heat drawn over the upload
    about = browser.find_element(By.ID, "explain-about").text
    assert ("Grad-CAM" if method == "gradcam" else "Occlusion") in about and "passes" in about
    # the gradient methods are offered for the classifier only
    browser.find_element(By.XPATH, "//input[@name='task' and @value='segment']/..").click()
    disabled = browser.find_element(By.CSS_SELECTOR, "#explain option[value='gradcam']").get_attribute("disabled")
    assert disabled is not None
