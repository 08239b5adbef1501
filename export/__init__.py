"""Export trained models to TorchScript and ONNX inside Triton model repositories (`python -m export`)."""
