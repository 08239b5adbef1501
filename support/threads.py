"""Keep torch's process-wide CPU thread count across code that changes it (an in-process backend does)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads_kept(restore_to: int | None = None) -> Iterator[None]:
    """Run the block, then set torch's intra-op thread count to `restore_to` (default: what it was before).

    `service.backends.local.LocalBackend` calls `torch.set_num_threads(settings.torch_threads)`, one
    thread by default, for the whole process: right for a gateway replica, wrong for the tests after it.
    """
    threads = torch.get_num_threads() if restore_to is None else restore_to
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
