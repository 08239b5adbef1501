"""The second deployment: the same app under plain uvicorn (`make serve-uvicorn`), in a process that cannot import Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from support.ports import free_port
from support.waiting import wait_for
from tests.service.test_api_contract import check_result, sample

ROOT = Path(__file__).resolve().parents[2]
# uvicorn's own command line, in a Python where any import of Ray fails
NO_RAY = """
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("Ray is not available here (tests/service/test_uvicorn_app.py)")
sys.meta_path.insert(0, NoRay())
import uvicorn
sys.exit(uvicorn.main())
"""


def test_the_app_serves_under_plain_uvicorn_without_ray(model_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CVSERVE_", "RAY_"))},
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_MODELS": "classifier",
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_WARM_UP_BATCH_SIZES": "false",
    }
    command = [sys.executable, "-c", NO_RAY, "--factory", "service.app:from_environment",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: server.poll() is not None or httpx.get(f"{url}/ready", timeout=2).status_code == 200,
            120, lambda: f"uvicorn did not get ready: {log.read_text()[-2000:]}", retry_on=(httpx.HTTPError,),
        )  # fmt: skip
        assert server.poll() is None, log.read_text()[-4000:]
        truth = sample(seed=7)
        answer = httpx.post(f"{url}/classify", content=truth.data, headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"]
        check_result("classifier", result, truth)
        assert answer.json()["backend"] == "embedded"
        metrics = httpx.get(f"{url}/metrics/", timeout=10).text  # the app's own registry
        assert 'cvserve_requests_total{endpoint="/classify",status="200"} 1.0' in metrics
        assert 'cvserve_model_latency_seconds_count{backend="embedded",model="classifier"}' in metrics
    finally:
        server.terminate()
        server.wait(30)
