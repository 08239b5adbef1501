"""Write a model's `model.onnx`: the same uint8-in contract and dynamic batch as its `model.pt`.

Two exporters, whichever works for the model:

* classifier, segmenter: `torch.onnx.export(dynamo=True)` (torch.export) with a dynamic batch
  dimension; opset 18.
* detector: torchvision's Faster R-CNN takes a list of images and loops over them in Python, which
  torch.export cannot keep dynamic and tracing unrolls for one batch size. So one image is traced
  with the TorchScript-based exporter (the path torchvision tests; opset 17), and that graph becomes
  the body of an ONNX `Loop` over the batch, whose scan outputs stack to BOXES/SCORES/LABELS/COUNT
  `[N, K, ...]`: one file, any batch size, the fixed-K contract.

Every file is reloaded in ONNX Runtime and run at batch 2 before it is kept: names, dtypes and dims
must be the contract's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export.errors import ExportError
from export.spec import ModelSpec, TensorSpec
from export.wrappers import DetectorWrapper, OneImageDetector

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DYNAMO_OPSET = 18
TRACED_OPSET = 17  # torchvision's RoIAlign/NMS symbolics; Loop and the rest exist since opset 11
BATCH_DIM = "batch"

_ONNX_TYPES = {
    torch.uint8: TensorProto.UINT8,
    torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64,
    torch.float32: TensorProto.FLOAT,
}


def write_onnx(spec: ModelSpec, path: Path) -> None:
    """Export `spec.module` to `path` as ONNX and check it in ONNX Runtime against the contract."""
    with _quiet_exporter():
        if isinstance(spec.module, DetectorWrapper):
            model = _loop_over_batch(_trace_one_image(spec), spec.inputs[0], spec.outputs)
        else:
            model = _export_dynamo(spec)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    check_onnx_contract(path, spec.inputs, spec.outputs)


def _export_dynamo(spec: ModelSpec) -> onnx.ModelProto:
    """torch.export-based ONNX with the batch dimension dynamic."""
    (image,) = spec.inputs
    example = torch.zeros((2, *image.dims), dtype=image.dtype)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=1024)
    try:
        program = torch.onnx.export(
            spec.module.eval(),
            (example,),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=[image.name],
            output_names=[tensor.name for tensor in spec.outputs],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    except Exception as exc:  # torch.export raises many types; the message says which op failed
        raise ExportError(f"ONNX export of the {spec.name} failed: {_first_line(exc)}") from exc
    assert program is not None
    return program.model_proto


def _trace_one_image(spec: ModelSpec) -> onnx.ModelProto:
    """The detector for one `[3,H,W]` image, traced (TorchScript-based exporter) to ONNX."""
    assert isinstance(spec.module, DetectorWrapper)
    (image,) = spec.inputs
    one = OneImageDetector(spec.module).eval()
    example = torch.randint(0, 256, image.dims, dtype=image.dtype, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as work:
        traced = Path(work) / "one_image.onnx"
        try:
            torch.onnx.export(
                one,
                (example,),
                str(traced),
                dynamo=False,
                opset_version=TRACED_OPSET,
                input_names=["image"],
                output_names=[f"one_{tensor.name}" for tensor in spec.outputs],
            )
        except Exception as exc:
            raise ExportError(f"ONNX export of the {spec.name} failed: {_first_line(exc)}") from exc
        return onnx.load(str(traced))


def _loop_over_batch(
    one: onnx.ModelProto, image: TensorSpec, outputs: Sequence[TensorSpec]
) -> onnx.ModelProto:
    """Wrap a one-image graph in a `Loop` over the batch: IMAGE [N,...] in, its outputs stacked [N,...] out.

    The body gathers image `i` and runs the one-image nodes; their weights stay initializers of the
    outer graph, which the body reads from the enclosing scope."""
    graph = one.graph
    (one_input,) = graph.input
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["loop_cond_in"], ["loop_cond_out"]),
            helper.make_node("Gather", [image.name, "loop_i"], [one_input.name], axis=0),
            *graph.node,
        ],
        "one_image",
        [
            helper.make_tensor_value_info("loop_i", TensorProto.INT64, []),
            helper.make_tensor_value_info("loop_cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("loop_cond_out", TensorProto.BOOL, []),
            *(
                helper.make_tensor_value_info(inner.name, _ONNX_TYPES[spec.dtype], list(spec.dims))
                for inner, spec in zip(graph.output, outputs, strict=True)
            ),
        ],
        value_info=list(graph.value_info),
    )
    nodes = [
        helper.make_node("Shape", [image.name], ["batch_shape"], start=0, end=1),
        helper.make_node("Squeeze", ["batch_shape"], ["batch_size"]),
        helper.make_node(
            "Constant", [], ["loop_true"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("Loop", ["batch_size", "loop_true"], [spec.name for spec in outputs], body=body),
    ]
    batched = helper.make_graph(
        nodes,
        "batched",
        [helper.make_tensor_value_info(image.name, _ONNX_TYPES[image.dtype], [BATCH_DIM, *image.dims])],
        [
            helper.make_tensor_value_info(spec.name, _ONNX_TYPES[spec.dtype], [BATCH_DIM, *spec.dims])
            for spec in outputs
        ],
        initializer=list(graph.initializer),
    )
    model = helper.make_model(
        batched,
        opset_imports=list(one.opset_import),
        producer_name=one.producer_name,
        producer_version=one.producer_version,
    )
    model.ir_version = one.ir_version
    return model


def check_onnx_contract(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Run `path` in ONNX Runtime at batch 2: its tensors must be the contract's names, dtypes and dims."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    want = ([t.name for t in inputs], [t.name for t in outputs])
    if names != want:
        raise ExportError(f"{path}: tensors {names} are not the contract's {want}")
    feed = {
        tensor.name: np.random.default_rng(0).integers(0, 256, (2, *tensor.dims), dtype=np.uint8)
        for tensor in inputs
    }
    for spec, value in zip(outputs, session.run(None, feed), strict=True):
        expected = (str(spec.dtype).removeprefix("torch."), (2, *spec.dims))
        if (str(value.dtype), value.shape) != expected:
            raise ExportError(
                f"{path}: output {spec.name} is {value.dtype}{list(value.shape)}, the contract says "
                f"{expected[0]}{list(expected[1])}"
            )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and tracer warnings meant for model authors, not for export's log."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
