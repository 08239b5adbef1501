"""cvserve gateway: Ray Serve ingress in front of an embedded TorchScript or a Triton backend."""
