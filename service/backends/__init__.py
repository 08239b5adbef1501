"""Inference backends: embedded TorchScript (Ray Serve batching) or Triton over gRPC/HTTP."""
