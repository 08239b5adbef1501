"""LitServe with batching on the same model and the same decode/preprocess/postprocess code.

LitServe's request is JSON or a form, so the image arrives as multipart field `file`. Batch size
and wait time are the gateway's (`CVSERVE_MAX_BATCH_SIZE`, `CVSERVE_BATCH_WAIT_TIMEOUT_S`), and so is
the runtime (`CVSERVE_RUNTIME`: the bench runs it over TorchScript, `litserve`, and over ONNX Runtime,
`litserve-onnxruntime`).

    python -m loadtests.baselines.litserve_server --model classifier --port 8200
"""

import argparse
import logging
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException, Request

from loadtests.baselines.pipeline import ModelPipeline
from service.handlers.common import Geometry
from service.imaging.images import ImageError
from service.settings import Settings
from service.handlers import HANDLERS
from tasks import MODELS

Prepared = tuple[np.ndarray, Geometry]
Answer = tuple[dict[str, np.ndarray], Geometry]


class ShapesAPI(ls.LitAPI):
    """decode + preprocess per request, one batched forward pass, postprocess per request."""

    def __init__(self, settings: Settings, model: str) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_wait_timeout_s,
            api_path=HANDLERS[model].endpoint,
        )
        self.settings = settings
        self.model = model

    def setup(self, device: str) -> None:
        """Load the model once per worker."""
        torch.set_num_threads(self.settings.torch_threads)
        self.pipeline = ModelPipeline.load(self.settings, self.model)

    # LitServe reads this annotation at run time: exactly `Request` makes it parse the body as a
    # form, and what arrives is that form (no `from __future__ import annotations` here for that).
    def decode_request(self, request: Request) -> Prepared:
        """Read the uploaded file and bring it to the model's input."""
        try:
            return self.pipeline.prepare(request["file"].file.read())
        except ImageError as error:
            raise HTTPException(error.status_code, str(error)) from error

    def batch(self, inputs: list[Prepared]) -> list[Prepared]:
        """Keep the batch as a list: images and geometries travel together."""
        return inputs

    def predict(self, batch: list[Prepared]) -> list[Answer]:
        """Run one forward pass over the whole batch."""
        outputs = self.pipeline.infer([image for image, _ in batch])
        return [(out, geometry) for out, (_, geometry) in zip(outputs, batch)]

    def unbatch(self, output: list[Answer]) -> list[Answer]:
        """One result per request, in order."""
        return output

    def encode_response(self, output: Answer) -> dict[str, Any]:
        """Postprocess to the task's JSON answer."""
        outputs, geometry = output
        return {"model": self.model, "results": [self.pipeline.answer(outputs, geometry)]}


def main() -> None:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="classifier", choices=MODELS)
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = Settings()
    api = ShapesAPI(settings, args.model)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=settings.request_timeout_s)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
