"""Export trained models to TorchScript inside Triton model repositories (`python -m export`)."""
