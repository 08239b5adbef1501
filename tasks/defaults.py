"""The demo models' default input sides, from training's configuration (read when asked, not at import)."""

from __future__ import annotations


def demo_size(name: str) -> int:
    """`DemoConfig().<name>`: "classifier_size" or "scene_size"."""
    from training.train import DemoConfig

    return int(getattr(DemoConfig(), name))
