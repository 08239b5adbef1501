"""Fuzzing WebSocket streams (/stream/detect): random query strings (options, the stream's own `track`, keys,
malformed escapes), then random binary and text messages, sent in lock step. A stream is either refused
right after the handshake with a documented close code and reason, or answers every message with a result
or an error message (never `internal`, never close 1011) and goes on; afterwards a new stream answers a good
frame. The real detector under uvicorn, a real WebSocket client; fixed example count and the committed
replay database (tests/hardening/fuzzing.py).
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.hardening import payloads
from tests.hardening.fuzzing import fuzz_settings, mutated

# docs/ERRORS.md, "WebSocket streams": the codes a stream may be refused with, and their reasons' first word
REFUSALS = {4401: "unauthorized", 4404: "model_disabled", 4422: "invalid_request", 1013: "too_many_streams"}
ANSWER_TIMEOUT_S = 60
FRAME_SEEDS = [
    payloads.encode(payloads.noise(24, 16), "PNG"),
    payloads.encode(payloads.noise(24, 16), "JPEG", quality=80),
    payloads.encode(payloads.noise(24, 16), "WEBP"),
    payloads.png_bomb(3000, 3000),
]
OPTION_NAMES = ["score_threshold", "max_detections", "track", "annotate", "api_key", "top_k", "return_png"]
OPTION_VALUES = ["0.5", "0", "-1", "2", "true", "false", "perhaps", "jpeg", "png", "", "nan", "1e309", "²"]

GOOD_OPTIONS = {
    "score_threshold": st.floats(0, 1).map(str),
    "max_detections": st.integers(1, 100).map(str),
    "track": st.sampled_from(["true", "false"]),
    "annotate": st.just("jpeg"),
}
queries = st.one_of(
    st.just(""),
    st.fixed_dictionaries({}, optional=GOOD_OPTIONS).map(urlencode),
    st.dictionaries(
        st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=6)),
        st.one_of(st.sampled_from(OPTION_VALUES), st.text(max_size=8)),
        max_size=3,
    ).map(urlencode),
    st.text(max_size=24).map(lambda text: quote(text, safe="=&%+;/?:@!$'()*,")),
)
messages = st.lists(
    st.one_of(mutated(FRAME_SEEDS, max_edits=4), st.text(max_size=64)),
    max_size=4,
)


def _answer(ws: ClientConnection) -> dict:
    """The next message: a result or an error that is not `internal`."""
    message = json.loads(ws.recv(timeout=ANSWER_TIMEOUT_S))
    assert message["type"] in ("result", "error"), message
    if message["type"] == "error":
        assert message["error"]["code"] != "internal", message
    return message


def _connect(url: str) -> ClientConnection:
    return connect(url, proxy=None, open_timeout=30, close_timeout=5, max_size=None)


def test_random_queries_and_messages_get_answers_or_documented_closes(inprocess_gateway: str) -> None:
    seen = {"refused": 0, "answered": 0}

    @fuzz_settings(max_examples=60)
    @given(query=queries, sent=messages)
    def one_stream(query: str, sent: list[bytes | str]) -> None:
        with _connect(f"ws://{inprocess_gateway}/stream/detect" + (f"?{query}" if query else "")) as ws:
            try:
                ready = json.loads(ws.recv(timeout=ANSWER_TIMEOUT_S))
            except ConnectionClosed as closed:
                code, reason = closed.rcvd.code, closed.rcvd.reason  # type: ignore[union-attr]
                assert code in REFUSALS and reason.startswith(REFUSALS[code]), (code, reason)
                seen["refused"] += 1
                return
            assert ready["type"] == "ready", ready
            for index, message in enumerate(sent):
                ws.send(message)
                answer = _answer(ws)
                assert answer["frame"] == index, answer
            ws.send("still there?")  # a text message: answered bad_request at once, and the stream goes on
            assert _answer(ws)["error"]["code"] == "bad_request"
            seen["answered"] += 1

    one_stream()
    print(f"stream fuzz: {seen}")
    with _connect(f"ws://{inprocess_gateway}/stream/detect?score_threshold=0.1") as ws:
        assert json.loads(ws.recv(timeout=ANSWER_TIMEOUT_S))["type"] == "ready"
        ws.send(payloads.encode(payloads.noise(48, 32), "PNG"))
        answer = _answer(ws)
        assert answer["type"] == "result" and answer["result"]["image"] == {"width": 48, "height": 32}, answer
