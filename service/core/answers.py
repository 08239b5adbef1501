"""A task's answer as JSON (the default) or as MessagePack, chosen by the request's `Accept` header.

MessagePack (`Accept: application/msgpack`; also `application/x-msgpack`, `application/vnd.msgpack`)
carries the same document as the JSON answer, with one difference: fields the JSON schema gives as
base64 (`/segment`'s `return_png` mask) are raw bytes (msgpack `bin`). Any other or missing Accept
keeps JSON; JSON also wins when the client rates it higher (`application/json;q=1, application/msgpack;q=0.5`).
Error answers are always JSON. Sizes and times against JSON: loadtests/RESULTS.md (answer formats).
"""

from __future__ import annotations

import base64
from typing import Any

import msgpack
from fastapi import Request, Response
from pydantic import BaseModel

from service.core.accept import accept_weights

MSGPACK = "application/msgpack"
MSGPACK_MEDIA_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
# Result fields that are base64 text in JSON and raw bytes in MessagePack.
BASE64_FIELDS = ("png",)


def wants_msgpack(request: Request) -> bool:
    """True when Accept names a MessagePack type (q > 0) at least as highly as application/json."""
    weights = accept_weights(request.headers)
    msgpack_q = max((weights.get(m, 0.0) for m in MSGPACK_MEDIA_TYPES), default=0.0)
    return msgpack_q > 0 and msgpack_q >= weights.get("application/json", 0.0)


def msgpack_document(answer: BaseModel) -> dict[str, Any]:
    """The answer's JSON document with its base64 fields as raw bytes."""
    document = answer.model_dump(mode="json")
    for result in document.get("results", ()):
        for name in BASE64_FIELDS:
            if isinstance(result.get(name), str):
                result[name] = base64.b64decode(result[name])
    return document


def encode_msgpack(answer: BaseModel) -> bytes:
    """The answer as MessagePack (`msgpack.unpackb(body)` reads it back)."""
    return msgpack.packb(msgpack_document(answer), use_bin_type=True)


def encode_answer(request: Request, answer: BaseModel) -> Response:
    """The answer in the format the request accepts: MessagePack when asked for, else JSON."""
    if wants_msgpack(request):
        return Response(encode_msgpack(answer), media_type=MSGPACK, headers={"Vary": "Accept"})
    return Response(answer.model_dump_json(), media_type="application/json", headers={"Vary": "Accept"})
