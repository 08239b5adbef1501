"""Run by Python at start-up when this folder is on PYTHONPATH: tritonclient, Ray and PyAV look absent,
as on the GPU machine's image (only loadtests/gpu/stubs/'s stand-in for av is let through)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

BLOCKED = {"tritonclient", "ray", "av"}


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] not in BLOCKED:
            return None
        # Only the stand-in under loadtests/gpu/stubs/ (where the check put it on the path) is found.
        where = [p for p in (path if path is not None else sys.path) if "loadtests/gpu/stubs" in str(p)]
        spec = importlib.machinery.PathFinder.find_spec(name, where) if where else None
        if spec is not None:
            return spec
        raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU image)", name=name)


sys.meta_path.insert(0, _Absent())
