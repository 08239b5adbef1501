"""The admission and deadline settings: defaults that work and combinations that cannot."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_admission_limit_defaults_below_serves_concurrency() -> None:
    settings = Settings(_env_file=None)
    assert 1 <= settings.admission_limit < settings.max_ongoing_requests
    assert Settings(max_ongoing_requests=16, max_batch_size=8).admission_limit == 12
    assert Settings(max_ongoing_requests=16, max_batch_size=8, max_in_flight_requests=5).admission_limit == 5


def test_admission_limit_must_leave_room_to_refuse() -> None:
    with pytest.raises(ValidationError, match="max_in_flight_requests"):
        Settings(max_ongoing_requests=16, max_batch_size=8, max_in_flight_requests=16)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("CVSERVE_MAX_PIXELS", "100")
    monkeypatch.setenv("CVSERVE_MAX_IMAGES_PER_REQUEST", "3")
    monkeypatch.setenv("CVSERVE_ALLOWED_FORMATS", "png,jpg")
    monkeypatch.setenv("CVSERVE_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("CVSERVE_RETRY_AFTER_S", "4")
    settings = Settings()
    assert (settings.max_body_bytes, settings.max_pixels, settings.max_images_per_request) == (2048, 100, 3)
    assert settings.allowed_formats == ("PNG", "JPEG")
    assert (settings.request_timeout_s, settings.retry_after_s) == (2.5, 4)
