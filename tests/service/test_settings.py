"""Settings come from CVSERVE_* variables, with safe defaults and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_bind_loopback_with_the_embedded_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CVSERVE_HOST", "CVSERVE_PORT", "CVSERVE_BACKEND", "CVSERVE_MODELS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.backend) == ("127.0.0.1", 8000, "embedded")
    assert settings.models == ("classifier", "detector", "segmenter")
    assert settings.model_repository.is_absolute()


def test_environment_with_one_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CVSERVE_PORT", "9001")
    monkeypatch.setenv("CVSERVE_BACKEND", "triton")
    monkeypatch.setenv("CVSERVE_MODELS", "detector, classifier")
    monkeypatch.setenv("CVSERVE_ALLOWED_FORMATS", "jpg,png")
    monkeypatch.setenv("CVSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("CVSERVE_MODEL_REPOSITORY", str(tmp_path))
    settings = Settings()
    assert settings.port == 9001 and settings.backend == "triton" and settings.max_batch_size == 4
    assert settings.models == ("detector", "classifier")
    assert settings.allowed_formats == ("JPEG", "PNG")
    assert settings.model_repository == tmp_path


@pytest.mark.parametrize(
    "overrides",
    [
        {"backend": "onnx"},
        {"device": "tpu"},
        {"models": "classifier,unknown"},
        {"models": ""},
        {"allowed_formats": "PNG,HEIC"},
        {"max_batch_size": 0},
        {"max_batch_size": 32, "max_ongoing_requests": 16},
        {"port": 70000},
        {"api_key": "short"},
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)


def test_api_key_is_secret() -> None:
    settings = Settings(api_key="a-long-enough-secret-key")
    assert "a-long-enough" not in repr(settings)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "a-long-enough-secret-key"


def test_a_network_address_without_an_api_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="CVSERVE_API_KEY") as refused:
        Settings(host="0.0.0.0")
    assert "CVSERVE_ALLOW_ANONYMOUS" in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2", "::ffff:127.0.0.1"])
def test_loopback_needs_no_api_key(host: str) -> None:
    assert Settings(host=host).api_key is None


def test_a_network_address_is_served_with_a_key_or_when_anonymous_is_meant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert Settings(host="0.0.0.0", api_key="a-long-enough-secret-key").api_key is not None
    with caplog.at_level("WARNING", logger="service.settings"):
        assert Settings(host="0.0.0.0", allow_anonymous=True).allow_anonymous
    assert "without CVSERVE_API_KEY" in caplog.text


def test_anonymous_is_allowed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="CVSERVE_ALLOW_ANONYMOUS"):
        Settings()
    monkeypatch.setenv("CVSERVE_ALLOW_ANONYMOUS", "true")
    assert Settings().host == "0.0.0.0"


@pytest.mark.parametrize(
    "overrides", [{"ray_node_ip": "my-host"}, {"haproxy_monitor_host": "auto"}, {"haproxy_monitor_host": "*"}]
)
def test_ray_and_haproxy_addresses_must_be_addresses(overrides: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)


def test_ray_and_haproxy_monitoring_default_to_loopback() -> None:
    settings = Settings(_env_file=None)
    assert (settings.ray_node_ip, settings.haproxy_monitor_host) == ("127.0.0.1", "127.0.0.1")
    assert Settings(ray_node_ip="auto").ray_node_ip == "auto"
