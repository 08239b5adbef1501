"""Byte counts a client writes in headers (Content-Length, OIP's Inference-Header-Content-Length) are ASCII
digits or a 400: `str.isdigit` also takes '¹²³' (they reach the app as latin-1 header text) and other
scripts' digits, which `int` refuses, and `int` refuses more than 4300 digits; neither may become a 500."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from service.core.errors import ApiError
from service.core.inputs import byte_count, read_body

NOT_COUNTS = ["²", "1²", "¹²³", "٣", "١٢", "１２", "12a", "-1", "+1", " 1", "1 ", "1_0", "0x10", "", "1.0"]


@pytest.mark.parametrize("text", NOT_COUNTS)
def test_only_ascii_digits_are_a_byte_count(text: str) -> None:
    assert byte_count(text) is None


@pytest.mark.parametrize(
    ("text", "count"), [("0", 0), ("007", 7), ("123456", 123456), ("0" * 5000 + "5", 5), ("9" * 5000, 10**18)]
)
def test_byte_counts_are_read_and_huge_ones_stay_past_every_limit(text: str, count: int) -> None:
    assert byte_count(text) == count


def _request(content_length: str, body: bytes = b"abc") -> Request:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/detect",
        "headers": [(b"content-length", content_length.encode("latin-1", errors="strict"))],
    }
    return Request(scope, receive)


def _refusal(content_length: str) -> tuple[int, str]:
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(_request(content_length), 1000))
    return refused.value.status_code, refused.value.code


@pytest.mark.parametrize("content_length", ["²", "³", "¹", "1²", "abc", "-3", ""])
def test_a_content_length_that_is_not_ascii_digits_is_400(content_length: str) -> None:
    assert _refusal(content_length) == (400, "bad_request")


@pytest.mark.parametrize("content_length", ["1001", "9" * 5000])
def test_a_content_length_over_the_limit_is_413_however_long(content_length: str) -> None:
    assert _refusal(content_length) == (413, "body_too_large")


def test_a_good_content_length_reads_the_body() -> None:
    assert asyncio.run(read_body(_request("3"), 1000)) == b"abc"
