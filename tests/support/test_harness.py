"""The harness's shared support package: ports, waiting, the process wrapper, seeds, box IoU.

The process tests start real subprocesses (Python's own http.server) and read real sockets.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from support.assertions import box_iou
from support.ports import RESERVED_RANGE, free_port, free_ports, reserved_free_port, reserved_free_ports
from support.process import HttpServer, ManagedProcess, ready_or_ended, spawn, start_server
from support.seeds import FRESH_SEED_BASE, fresh_seeds
from support.threads import torch_threads_kept
from support.waiting import wait_for
from training.data import EVAL_SEED_BASE, eval_seeds, train_seeds
from training.train import DemoConfig


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in [*ports, free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_reserved_free_port_is_in_its_range_and_free() -> None:
    port = reserved_free_port()
    assert port in RESERVED_RANGE
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, "", 7, 8])
    assert wait_for(lambda: next(calls), 5, "a value", interval_s=0.01) == 7


def test_wait_for_times_out_naming_what_and_the_last_error() -> None:
    attempts = []

    def refused() -> bool:
        attempts.append(time.monotonic())
        raise ConnectionRefusedError(f"attempt {len(attempts)}")

    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        wait_for(refused, 0.3, lambda: f"the server ({len(attempts)} tries)", 0.05, retry_on=(OSError,))
    assert 0.3 <= time.monotonic() - started < 2
    message = str(raised.value)
    assert message.startswith("timed out after 0.3 s: the server (") and f"attempt {len(attempts)}" in message
    assert len(attempts) >= 3


def test_wait_for_lets_other_errors_through_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], 30, "never", retry_on=(OSError,))
    assert time.monotonic() - started < 1


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_start_server_is_ready_when_its_path_answers_and_stops_with_its_group(tmp_path: Path) -> None:
    (tmp_path / "ready").write_text("yes")
    port = free_port()
    command = [*_http_server(port), "--directory", str(tmp_path)]
    server = start_server("files", command, port, "/ready", tmp_path / "logs", timeout_s=60)
    assert isinstance(server, HttpServer) and server.url == f"http://127.0.0.1:{port}"
    assert server.running() and listening(port)
    server.stop()
    assert not server.running() and not listening(port)
    assert server.log_path == tmp_path / "logs" / "files.log" and "GET /ready" in server.log_tail()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('bad flag --nope'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*bad flag --nope"):
        start_server("broken", command, free_port(), "/ready", tmp_path, timeout_s=60)


def test_a_server_never_ready_times_out_and_is_ended(tmp_path: Path) -> None:
    port = free_port()
    server = HttpServer(
        spawn(_http_server(port), tmp_path / "log", cwd=tmp_path), tmp_path / "log", port, "/missing"
    )
    with pytest.raises(TimeoutError, match="server not ready"):
        ready_or_ended(server, 2)
    assert not server.running()


class _Sleeper(ManagedProcess):
    def is_ready(self) -> bool:
        return True


def test_kill_ends_the_whole_process_group(tmp_path: Path) -> None:
    """A child the leader started is gone too once the group is killed."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    leader = _Sleeper(spawn([sys.executable, "-c", script], tmp_path / "log"), tmp_path / "log")
    child_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child's pid"))
    leader.stop(timeout_s=5)
    wait_for(lambda: not Path(f"/proc/{child_pid}").exists() or _zombie(child_pid), 10, "the child to die")


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_fresh_seeds_are_neither_training_nor_evaluation_seeds() -> None:
    config = DemoConfig()
    evaluation = eval_seeds(config.eval_images)
    seeds = fresh_seeds(500, offset=200)
    assert seeds.start == FRESH_SEED_BASE + 200 and len(seeds) == 500
    assert seeds.start >= evaluation.stop > evaluation.start == EVAL_SEED_BASE
    for run in (config.seed, 1, 99):  # any run's training seeds stay below the evaluation base
        assert train_seeds(run, 5_000_000, config.scene_train_images).stop <= EVAL_SEED_BASE
    with pytest.raises(ValueError):
        fresh_seeds(-1)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),
        ([3, 3, 3, 3], [3, 3, 3, 3], 1.0),  # two equal empty boxes
        ([3, 3, 3, 3], [4, 4, 4, 4], 0.0),
    ],
)
def test_box_iou_of_lists_and_arrays(a: list[float], b: list[float], expected: float) -> None:
    import numpy as np

    for left, right in ((a, b), (np.array(a, float), b), (a, np.array(b, np.float32))):
        assert box_iou(left, right) == pytest.approx(expected)
        assert isinstance(box_iou(left, right), float)


def test_reserved_free_ports_are_distinct_bindable_and_reserved() -> None:
    ports = reserved_free_ports(4)
    assert len(set(ports)) == 4 and all(port in RESERVED_RANGE for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_torch_threads_kept_gives_back_the_thread_count() -> None:
    before = torch.get_num_threads()
    with torch_threads_kept():
        torch.set_num_threads(1)  # what an in-process backend does
    assert torch.get_num_threads() == before
    try:
        with torch_threads_kept(restore_to=1):
            pass
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("argv", "whole"),
    [([], True), (["tests/support"], False), (["-k", "harness"], False), (["-m", "not live"], False)],
)
def test_only_the_whole_suite_writes_the_durations_behind_the_committed_table(argv: list[str], whole: bool) -> None:
    from _pytest.config import _prepareconfig

    from tests.conftest import whole_suite

    config = _prepareconfig(["-p", "no:cacheprovider", *argv])
    try:
        assert whole_suite(config) is whole
    finally:
        config._ensure_unconfigure()
