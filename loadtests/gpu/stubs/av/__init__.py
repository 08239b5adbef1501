"""Stand-in for PyAV where it is not installed (the GPU check's image; its wheel is 34 MiB).

service/surfaces/video.py imports `av` when the app is built, though only its video routes use it;
the GPU check measures no video route, so its servers get this module instead (and record that they
did). Every use fails with one clear error. Remove once video.py imports av lazily.
"""

from __future__ import annotations

from typing import Any, NoReturn

STUB = True
time_base = 1_000_000


class FFmpegError(Exception):
    """Never raised: the name video.py catches."""


def _unavailable(*args: Any, **kwargs: Any) -> NoReturn:
    raise RuntimeError("PyAV is not installed here (loadtests/gpu/stubs/av stands in): video is unavailable")


open = _unavailable  # noqa: A001 - av.open


class VideoFrame:
    from_ndarray = staticmethod(_unavailable)
