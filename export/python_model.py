"""Triton python-backend model that serves the exported TorchScript `model.pt` on CPU.

`python -m export` copies this file verbatim to `<cpu repository>/<model>/1/model.py`, beside
the same model.pt the libtorch repository serves. It runs inside Triton's python stub, so it
imports nothing from this project: only torch, torchvision and `triton_python_backend_utils`.
"""

from __future__ import annotations

import json
import traceback
import warnings
from pathlib import Path

import torch
import torchvision  # noqa: F401  registers torchvision::nms / roi_align, which the detector's graph calls
import triton_python_backend_utils as pb_utils

# The python backend runs one model instance per process; two threads keep a shared CPU usable.
MAX_THREADS = 2


class TritonPythonModel:
    """Load model.pt once; run all requests of a dynamic batch through it in one call."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read tensor names from config.pbtxt and load the TorchScript model."""
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        torch.set_num_threads(min(MAX_THREADS, torch.get_num_threads()))
        with warnings.catch_warnings():  # service.backends.torchscript.quiet_jit, which this file cannot import
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
            self.model = torch.jit.load(str(Path(__file__).with_name("model.pt")), map_location="cpu")
        self.model.eval()

    def execute(self, requests: list) -> list:
        """Concatenate the requests' images, infer once, split the outputs back per request."""
        images = [
            torch.from_numpy(pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy())
            for request in requests
        ]
        sizes = [len(image) for image in images]
        try:
            with torch.no_grad():
                outputs = self.model(torch.cat(images))
        except RuntimeError:
            pb_utils.Logger.log_error(f"inference failed for {sum(sizes)} images:\n{traceback.format_exc()}")
            error = pb_utils.TritonError("inference failed (see the server log)")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        per_request = zip(*(output.split(sizes) for output in outputs), strict=True)
        return [
            pb_utils.InferenceResponse(
                [
                    pb_utils.Tensor(name, part.numpy())
                    for name, part in zip(self.output_names, parts, strict=True)
                ]
            )
            for parts in per_request
        ]
