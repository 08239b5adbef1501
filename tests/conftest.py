"""Session fixtures shared by the whole suite: one local Ray, one Serve HTTP proxy, deploy helper.

Ray and Serve start lazily, once per session, only for tests that ask for them; everything
listens on free ports so the suite can run beside other Ray/Serve instances on the machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import torch

from service.__main__ import haproxy_log_sink, make_private_dir, ray_environment
from service.settings import Settings
from support.ports import free_port, free_ports, reserved_free_port, reserved_free_ports
from support.threads import torch_threads_kept
from support.waiting import wait_for
from tasks import MODELS

if TYPE_CHECKING:
    from stack.triton import TritonServer

# tests/client and tests/oip import these from here.
wait_until = wait_for
__all__ = ["free_port", "reserved_free_port", "wait_until"]

ROOT = Path(__file__).resolve().parents[1]

# The two tiers. The in-process tier (HTTP contract, handlers, export, images, errors) runs the app
# on TestClient or a uvicorn thread with real TorchScript models in the pytest process. The live
# tier needs real servers: Ray Serve (any test whose fixtures reach `ray_session`), tritonserver,
# Prometheus, HAProxy, a browser, several nodes, or the service started as a process.
# `pytest -m "not live"` (`make test-inprocess`) runs the first alone.
LIVE_FIXTURES = {"ray_session", "tiny_triton", "cpu_triton", "prometheus", "browser", "keyed_server"}
LIVE_PATHS = (
    "tests/browser/", "tests/ops/", "tests/scale/", "tests/security/", "tests/triton/", "tests/client/",
    "tests/loadtests/test_bench.py", "tests/loadtests/test_locust.py", "tests/loadtests/test_streams_bench.py",
    "tests/service/deploy/test_haproxy.py", "tests/service/test_uvicorn_app.py",
    "tests/video/test_flood_memory.py",
)  # fmt: skip


# Every test's setup, call and teardown seconds, written at the end of the session for the committed
# table (`python scripts/durations_table.py` → docs/TEST_DURATIONS.md).
DURATIONS_FILE = ROOT / "test-artifacts" / "durations.json"
_durations: dict[str, dict[str, float]] = {}
_outcomes: dict[str, int] = {}
_session_started = time.monotonic()
# CPU seconds the whole machine (servers and subprocesses included) spent during each test: against its
# wall time, how busy the two cores were, which says where running tests side by side could gain.
_machine_cpu: dict[str, float] = {}


def machine_cpu_seconds() -> float | None:
    """CPU seconds every process of this machine has used since boot (/proc/stat; None where it is absent)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    before = machine_cpu_seconds()
    yield
    after = machine_cpu_seconds()
    if before is not None and after is not None:
        _machine_cpu[item.nodeid] = round(after - before, 2)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations.setdefault(report.nodeid, {})[report.when] = round(report.duration, 3)
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def whole_suite(config: pytest.Config) -> bool:
    """Whether this session runs the whole suite (`make test`: the testpaths, no -k or -m selection)."""
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _durations:
        return
    # A partial run must not replace the whole suite's figures behind the committed table.
    target = DURATIONS_FILE if whole_suite(session.config) else DURATIONS_FILE.with_name("durations-partial.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - (time.monotonic() - _session_started))),
        # The vector instructions too: the same suite took 778 s on AVX-512 and 1,376 s on AVX2 (2 cores).
        "machine": f"{os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.python_implementation()} {platform.python_version()}",
        "wall_s": round(time.monotonic() - _session_started, 1),
        "outcomes": ", ".join(f"{n} {k}" for k, n in sorted(_outcomes.items())),
        "tests": _durations,
        "machine_cpu_s": _machine_cpu,
    }, indent=1) + "\n")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path).resolve().relative_to(ROOT).as_posix()
        if LIVE_FIXTURES.intersection(getattr(item, "fixturenames", ())) or path.startswith(LIVE_PATHS):
            item.add_marker(pytest.mark.live)


# The session's Ray runs as `python -m service` runs it by default: Serve's throughput mode with
# HAProxy in front of the gateway replicas, on loopback, with a token from a private directory.
# Ray reads these variables when it is imported (here, for this process) and when `ray.init`
# starts its processes (in `ray_session`); in between they are taken back out of the environment,
# so servers that tests start themselves get only what their own settings ask for.
# Every port it takes is free: HAProxy's and Serve's fallback proxy's (Ray's default 8500) too.
_HAPROXY_STATS_PORT, _HAPROXY_METRICS_PORT, _FALLBACK_PROXY_PORT = reserved_free_ports(3)
_SERVE_SETTINGS = Settings(
    ingress="haproxy", haproxy_stats_port=_HAPROXY_STATS_PORT, haproxy_metrics_port=_HAPROXY_METRICS_PORT
)
_PRIVATE_DIR = make_private_dir(_SERVE_SETTINGS)
RAY_ENVIRONMENT = {
    **ray_environment(_SERVE_SETTINGS, _PRIVATE_DIR),
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_FALLBACK_PROXY_PORT),
}


@contextmanager
def ray_environment_applied(**extra: str) -> Iterator[None]:
    """`RAY_ENVIRONMENT` (and `extra`) in os.environ for the block, then the environment as it was."""
    wanted = {**RAY_ENVIRONMENT, **extra}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# This process (the tests' driver) keeps handle routing on Serve's own loop thread, so tests can
# call deployment handles synchronously; the replicas run fully in throughput mode.
with ray_environment_applied(RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="1"):
    import ray.serve._private.constants  # noqa: F401  (reads the Serve variables now)

# Logical CPUs for the test Ray: enough for every deployment the suite creates at once
# (scheduling units, not cores; the replicas share the machine's real cores).
RAY_NUM_CPUS = 16


# In-process backends (`LocalBackend`) set torch's thread count for the whole process. A test gives
# back the count it started with; a module, the count the session started with (a session- or
# package-scoped backend built during the module included), so later tests run on every core again.
SESSION_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_per_module() -> Iterator[None]:
    with torch_threads_kept(SESSION_TORCH_THREADS):
        yield


@pytest.fixture(autouse=True)
def _torch_threads_per_test() -> Iterator[None]:
    with torch_threads_kept():
        yield


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The exported model repository (`make models`); CVSERVE_TEST_MODEL_REPOSITORY overrides it."""
    path = Path(os.environ.get("CVSERVE_TEST_MODEL_REPOSITORY", ROOT / "model_repository")).resolve()
    missing = [m for m in MODELS if not (path / m / "config.pbtxt").is_file() or not any(path.glob(f"{m}/*/model.pt"))]
    if missing:
        pytest.fail(f"{path} lacks the exported models {missing}: run `make models` first")
    return path


def start_on_free_ports(repository: Path, work_dir: Path, ready_timeout_s: float = 120.0) -> TritonServer:
    """Start tritonserver on `repository` with three fresh ports and wait until it is ready."""
    from stack.triton import start_tritonserver

    return start_tritonserver(repository, *free_ports(3), work_dir=work_dir, ready_timeout_s=ready_timeout_s)


def delete_app(name: str) -> None:
    """Delete a test's Serve app without waiting for its replicas to drain (about 3 s each): nothing after it
    needs them gone, and left running, idle replicas would report metrics through every later folder."""
    from ray import serve

    serve.delete(name, _blocking=False)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Triton's tiny `echo` models (tests/triton/tiny_models.py): Triton's behaviour and metrics, cheaply."""
    from tests.triton.tiny_models import write_tiny_repository

    return write_tiny_repository(tmp_path_factory.mktemp("tiny_repository"))


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The session's one tritonserver with the tiny models, for tests/triton and tests/ops (idles at 0.002
    cores)."""
    server = start_on_free_ports(tiny_repository, tmp_path_factory.mktemp("tiny_triton"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """Port of the session Ray's Prometheus metrics agent."""
    return free_port()


@pytest.fixture(scope="session")
def ray_session(ray_metrics_port: int) -> Iterator[None]:
    """A fresh local Ray for this test session (own temp dir), shut down at the end."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="cvray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    stack = ExitStack()
    stack.enter_context(haproxy_log_sink(_SERVE_SETTINGS, _PRIVATE_DIR))
    with ray_environment_applied():  # Ray's processes inherit it from here
        _start_ray(temp_dir, ray_metrics_port)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        stack.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(_PRIVATE_DIR, ignore_errors=True)


def _start_ray(temp_dir: str, ray_metrics_port: int) -> None:
    import ray

    ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,  # replica logs stay in <temp_dir>/session_latest/logs
        _metrics_export_port=ray_metrics_port,
        # export metrics every 2 s instead of 10 s, so metric tests settle sooner
        _system_config={"metrics_report_interval_ms": 2000},
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        _node_ip_address="127.0.0.1",
    )


@pytest.fixture(scope="session")
def serve_url(ray_session: None) -> str:
    """Base URL of the session's Serve HTTP proxy (no trailing slash)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


Deploy = Callable[..., str]


@pytest.fixture(scope="session")
def deploy(serve_url: str) -> Deploy:
    """`deploy(app, name, route_prefix)`: run a Serve application and return its base URL once routed."""
    from ray import serve

    def _deploy(app: object, name: str, route_prefix: str) -> str:
        serve.run(app, name=name, route_prefix=route_prefix)  # returns once every replica is up

        def routed() -> bool:
            try:
                return route_prefix in httpx.get(f"{serve_url}/-/routes", timeout=5).json()
            except httpx.HTTPError:
                return False

        wait_for(routed, 60, f"Serve proxy never routed {route_prefix} to {name}")
        return serve_url + route_prefix.rstrip("/")

    return _deploy


@pytest.fixture(scope="session")
def embedded_gateway(deploy: Deploy, model_repository: Path) -> str:
    """Base URL of the gateway with the embedded backend over the exported models."""
    from service.deploy.serve import build_app
    from service.settings import Settings

    settings = Settings(
        model_repository=model_repository,
        device="cpu",
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        torch_threads=1,
    )
    return deploy(build_app(settings), "embedded", "/embedded")
