"""CI-sized load test: headless Locust (loadtests/locustfile.py) against the session's gateway."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def run_locust(
    host: str, out: Path, run_time_s: int, users: int, *extra: str
) -> tuple[int, str, dict[str, dict[str, str]]]:
    """Run Locust headless for `run_time_s`; return its exit code, output tail and CSV stats by name."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{run_time_s}s", "--stop-timeout", "15",
        "--only-summary", "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
        "--image-count", "8", "--exit-code-on-error", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=run_time_s + 45, check=False
    )
    with (out / "locust_stats.csv").open(newline="") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    return done.returncode, (done.stdout + done.stderr)[-3000:], rows


def test_mixed_load_on_every_endpoint_has_no_failures(embedded_gateway: str, tmp_path: Path) -> None:
    code, output, rows = run_locust(
        embedded_gateway, tmp_path, 10, 4, "--wait-min", "0.05", "--wait-max", "0.5"
    )
    assert code == 0, output
    for endpoint in ("/classify", "/detect", "/segment"):
        assert int(rows[endpoint]["Request Count"]) > 0, f"no {endpoint} requests were made:\n{output}"
        assert rows[endpoint]["Failure Count"] == "0", output
    assert rows["Aggregated"]["Failure Count"] == "0", output
    assert (tmp_path / "locust.html").stat().st_size > 0


def test_task_weights_choose_the_endpoints(embedded_gateway: str, tmp_path: Path) -> None:
    code, output, rows = run_locust(
        embedded_gateway, tmp_path, 4, 2, "--detect-weight", "0", "--segment-weight", "0", "--upload", "raw"
    )
    assert code == 0, output
    assert set(rows) == {"/classify", "Aggregated"}, output
    assert int(rows["/classify"]["Request Count"]) > 0, output


def test_failed_requests_fail_the_run(embedded_gateway: str, tmp_path: Path) -> None:
    """The zero-failure check above can fail: errors (here 404s) make Locust exit non-zero."""
    code, output, rows = run_locust(
        embedded_gateway + "/no-such-prefix", tmp_path, 3, 1, "--segment-weight", "0"
    )
    assert code == 1, output
    assert int(rows["Aggregated"]["Failure Count"]) > 0, output
