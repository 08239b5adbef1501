"""Docker-free runners for the compose services (tritonserver on CPU, Prometheus, gateway)."""
