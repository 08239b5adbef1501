"""Write a tiny python-backend model repository for launcher and backend tests.

`echo` sums each image and reports the batch size Triton's dynamic batcher gave it;
`slow` does the same after sleeping, to provoke deadlines honestly.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_DIMS = (3, 8, 8)

_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "IMAGE", data_type: TYPE_UINT8, dims: [3, 8, 8] }} ]
output [
  {{ name: "SUM", data_type: TYPE_FP32, dims: [1] }},
  {{ name: "BATCH", data_type: TYPE_INT32, dims: [1] }}
]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
parameters {{ key: "sleep_s", value: {{ string_value: "{sleep_s}" }} }}
parameters {{ key: "task", value: {{ string_value: "test" }} }}
"""

_MODEL = '''import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sleep_s = float(config["parameters"]["sleep_s"]["string_value"])

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        batch = sum(len(image) for image in images)
        time.sleep(self.sleep_s)
        responses = []
        for image in images:
            sums = image.reshape(len(image), -1).sum(axis=1, dtype=np.float32)[:, None]
            sizes = np.full((len(image), 1), batch, dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("SUM", sums), pb_utils.Tensor("BATCH", sizes)])
            )
        return responses
'''


def write_tiny_repository(root: Path) -> Path:
    """Create `echo` and `slow` models under `root`; return `root`."""
    for name, sleep_s, delay_us in (("echo", 0.0, 50000), ("slow", 1.0, 1000)):
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (root / name / "config.pbtxt").write_text(_CONFIG.format(name=name, sleep_s=sleep_s, delay_us=delay_us))
        (version / "model.py").write_text(_MODEL)
    return root
