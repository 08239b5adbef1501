"""Read Triton's per-model counters from its Prometheus endpoint."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def triton_metric(metrics_url: str, name: str, model: str, default: float | None = None) -> float:
    """The value of counter `name` for `model` at `metrics_url`; `default` when Triton has no such series
    yet (a model's series appear at its first inference), else KeyError."""
    text = httpx.get(metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # the parser renames counters' samples to <name>_total
            if family.name == name and sample.labels.get("model") == model:
                return sample.value
    if default is None:
        raise KeyError(f"{name} for model {model} not in Triton's metrics")
    return default
