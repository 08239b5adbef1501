"""What a user writes by hand: FastAPI + torch, one uvicorn worker, one image at a time, no batching.

It loads the same model.pt and runs the service's own decode/preprocess/postprocess, so only the
serving machinery differs from ours. The image arrives as multipart field `file` (FastAPI's
UploadFile), which our gateway and LitServe accept too, so every server gets the same requests.

    python -m loadtests.baselines.handwritten --model classifier --port 8100
"""

from __future__ import annotations

import argparse
import logging

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, UploadFile

from loadtests.baselines.pipeline import ModelPipeline
from service.imaging.images import ImageError
from service.settings import Settings
from tasks import MODELS


def create_app(settings: Settings, model: str) -> FastAPI:
    """One POST endpoint for `model`'s task, plus /health."""
    torch.set_num_threads(settings.torch_threads)
    pipeline = ModelPipeline.load(settings, model)
    app = FastAPI(title=f"hand-written {model} server")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(pipeline.endpoint)
    async def predict(file: UploadFile) -> dict[str, object]:
        try:
            image, geometry = pipeline.prepare(await file.read())
        except ImageError as error:
            raise HTTPException(error.status_code, str(error)) from error
        (outputs,) = pipeline.infer([image])
        return {"model": model, "results": [pipeline.answer(outputs, geometry)]}

    return app


def main() -> None:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="classifier", choices=MODELS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(
        create_app(Settings(), args.model), host=args.host, port=args.port, workers=1, log_level="warning"
    )


if __name__ == "__main__":
    main()
