"""One model owner per GPU, fed by many HTTP processes, over a Unix socket.

A GPU is best used by one process: one CUDA context, one copy of each model, one batcher that sees
every request (so batches fill), one pipelined runner (service/backends/pipelined.py). HTTP parsing,
image decoding and answer encoding are CPU work that wants many processes. So the owner
(`python -m service.owner_app --socket PATH`, service/owner_app.py) loads the models into a
`LocalBackend` on the device and answers on a Unix socket; each uvicorn process talks to it through
`OwnerBackend`, a `Backend` like any other. One connection per HTTP process carries all its requests
at once (multiplexed by id), so their images meet in the owner's batches.

Frames: a 4-byte big-endian length, then a msgpack map. Client → owner: `{"op": "infer", "id", "model",
"images": [image...]}`, `{"op": "cancel", "id"}`, `{"op": "ready"|"decoded", "id"}`, `{"op":
"announce"|"arrived", "model", "images": n}`; owner → client: `{"id", "outputs": [{name: array}...],
"timings": [[queue_s, model_s, batch_size]...]}`, `{"id", "ready": bool}`, `{"id", "decoded": {model:
{"device": n, "cpu": n}}}`, `{"id", "error": "image", "index", "status", "code",
"message"}` (an image the owner's decode refused: the client's 4xx) or `{"id", "error": code, "message"}`,
each with `"decodes": bool`. An array is `{"dtype", "shape", "data"}`. An image is either an array
(preprocessed uint8 `[3,H,W]`) or, once the owner has said it `decodes`, `{"jpeg": bytes, "orientation":
1-8}`: the file itself, which the owner decodes with the rest of its batch on the device
(service/core/device_decode.py), so the HTTP processes only read headers and a JPEG travels at its
own size. A process's first request, before any answer, sends arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from service.backends.base import Backend, BackendUnavailable, Encoded, refusal, refused
from service.imaging.images import ImageError
from service.timing import BatchTiming

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30


def pack_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}


def unpack_array(packed: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(packed["data"], dtype=np.dtype(packed["dtype"])).reshape(packed["shape"])


def pack_image(image: np.ndarray | Encoded) -> dict[str, Any]:
    if isinstance(image, Encoded):
        return {"jpeg": image.data, "orientation": image.orientation}
    return pack_array(image)


def unpack_image(packed: dict[str, Any]) -> np.ndarray | Encoded:
    if "jpeg" in packed:
        return Encoded(packed["jpeg"], int(packed["orientation"]))
    return unpack_array(packed)


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_FRAME:
            raise ValueError(f"frame of {length} bytes")
        return msgpack.unpackb(await reader.readexactly(length), raw=False)
    except asyncio.IncompleteReadError:
        return None


def frame(message: dict[str, Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


# --- the owner ------------------------------------------------------------------------------------


class ModelOwner:
    """Answers `OwnerBackend`s on a Unix socket with `backend` (a `LocalBackend` on the device)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.connections = 0
        self._open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}  # each connection's handler

    async def close_connections(self, timeout_s: float = 5.0) -> None:
        """End every connection and wait (at most `timeout_s`) for its handler, before the backend closes.
        The handlers read the end of their streams and return: left to the loop's shutdown, they would be
        cancelled, and Python 3.11's `start_unix_server` logs each cancelled handler as an error."""
        for writer in self._open:
            writer.close()
        handlers = set(self._open.values())
        if handlers:
            await asyncio.wait(handlers, timeout=timeout_s)

    async def serve(self, path: str | Path) -> asyncio.AbstractServer:
        """Listen on `path` (replacing a stale socket file); the caller keeps the server."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return await asyncio.start_unix_server(self._connection, path=str(path), limit=MAX_FRAME)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open[writer] = asyncio.current_task()  # type: ignore[assignment]
        lock = asyncio.Lock()
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while (message := await read_frame(reader)) is not None:
                op = message.get("op")
                if op == "announce":
                    self.backend.announce(message["model"], int(message["images"]))
                elif op == "arrived":
                    self.backend.arrived(message["model"], int(message["images"]))
                elif op == "cancel":
                    task = running.get(message["id"])
                    if task is not None:
                        task.cancel()
                else:
                    task = asyncio.create_task(self._answer(message, writer, lock))
                    running[message["id"]] = task
                    task.add_done_callback(lambda _, key=message["id"]: running.pop(key, None))
        except (ConnectionError, ValueError) as error:
            log.warning("model owner: a connection broke: %s", error)
        finally:
            self.connections -= 1
            self._open.pop(writer, None)
            for task in running.values():  # the HTTP process is gone: its images need not be batched
                task.cancel()
            writer.close()

    async def _answer(
        self, message: dict[str, Any], writer: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        reply: dict[str, Any] = {"id": message["id"], "decodes": self.backend.decodes_on_device}
        try:
            if message["op"] == "ready":
                reply["ready"] = await self.backend.ready()
            elif message["op"] == "decoded":  # how many JPEGs each model's batches decoded where (the GPU check)
                counts = getattr(self.backend, "decode_counts", None)
                reply["decoded"] = counts() if counts is not None else {}
            elif message["op"] == "infer":
                images = [unpack_image(image) for image in message["images"]]
                timings = [BatchTiming() for _ in images]
                outputs = await self.backend.infer_many(message["model"], images, timings)
                reply["outputs"] = [
                    {name: pack_array(value) for name, value in out.items()} for out in outputs
                ]
                reply["timings"] = [[t.queue_s, t.model_s, t.batch_size] for t in timings]
            else:
                reply |= {"error": "bad_request", "message": f"unknown op {message['op']!r}"}
        except asyncio.CancelledError:
            return
        except ImageError as error:  # the client's image: our own words, for the client
            reply |= {"error": "image", **refusal(error)}
        except BackendUnavailable as error:
            reply |= {"error": "unavailable", "message": str(error)}
        except KeyError as error:
            reply |= {"error": "unknown_model", "message": f"no model {error} here"}
        except Exception:
            log.exception("model owner: %s failed", message.get("op"))
            reply |= {"error": "failed", "message": "the model owner failed on this request"}
        async with lock:
            with contextlib.suppress(ConnectionError):
                writer.write(frame(reply))
                await writer.drain()


# --- the HTTP processes' side ---------------------------------------------------------------------


class OwnerBackend(Backend):
    """`Backend` over a model owner's Unix socket: one connection per process, opened on first use and
    again after it breaks; requests run concurrently over it."""

    def __init__(self, path: str | Path, ready_timeout_s: float = 1.0) -> None:
        self.path = str(path)
        self.ready_timeout_s = ready_timeout_s
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self.decodes_on_device = False  # what the owner said in its last answer (every answer says)

    async def _connected(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(self.path, limit=MAX_FRAME)
                except OSError as error:
                    raise BackendUnavailable("the model owner is not answering; retry shortly") from error
                self._reader_task = asyncio.create_task(self._read(reader))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_frame(reader)) is not None:
                self.decodes_on_device = bool(message.get("decodes"))
                future = self._pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (ConnectionError, ValueError):
            pass
        finally:
            if self._writer is not None:
                self._writer.close()
            self._writer = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BackendUnavailable("the model owner went away; retry shortly"))
            self._pending.clear()

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        writer = await self._connected()
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            writer.write(frame(message | {"id": request_id}))
            await writer.drain()
            return await future
        except asyncio.CancelledError:  # the caller gave up: the owner drops the images if not yet batched
            self._pending.pop(request_id, None)
            if self._writer is not None and not self._writer.is_closing():
                self._writer.write(frame({"op": "cancel", "id": request_id}))
            raise
        except ConnectionError as error:
            self._pending.pop(request_id, None)
            raise BackendUnavailable("the model owner went away; retry shortly") from error

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image through `model` in the owner."""
        return (await self.infer_many(model, [image]))[0]

    async def infer_many(
        self, model: str, images: Sequence[np.ndarray], timings: Sequence[BatchTiming] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Send all of one request's images at once (so they share a batch in the owner); outputs in order."""
        reply = await self._call({"op": "infer", "model": model, "images": [pack_image(i) for i in images]})
        if reply.get("error") == "image":
            raise refused(reply)
        if "error" in reply:
            raise BackendUnavailable(f"model {model}: {reply['message']}")
        for timing, (queue_s, model_s, batch_size) in zip(timings or (), reply["timings"], strict=False):
            timing.queue_s, timing.model_s, timing.batch_size = queue_s, model_s, batch_size
        return [{name: unpack_array(value) for name, value in out.items()} for out in reply["outputs"]]

    def announce(self, model: str, images: int) -> None:
        self._notify({"op": "announce", "model": model, "images": images})

    def arrived(self, model: str, images: int) -> None:
        self._notify({"op": "arrived", "model": model, "images": images})

    def _notify(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(message))

    async def ready(self) -> bool:
        """Whether the owner answers and its models are ready (within `ready_timeout_s`)."""
        try:
            reply = await asyncio.wait_for(self._call({"op": "ready"}), self.ready_timeout_s)
        except (BackendUnavailable, TimeoutError):
            return False
        return bool(reply.get("ready"))

    async def decoded(self) -> dict[str, dict[str, int]]:
        """Per model, the JPEGs the owner decoded on its device and those its CPU path took instead."""
        return dict((await self._call({"op": "decoded"})).get("decoded", {}))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
