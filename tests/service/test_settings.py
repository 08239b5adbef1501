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
