"""The trained demo models, kept outside the clone: `<cache>/demo-<key>/`, one entry per training key.

A clone (or a CI run on a machine that trained once) copies a matching entry into its own output
directory instead of training for a quarter of an hour. The key is `training.train.training_key`:
everything that decides the weights, and nothing else. An entry appears by one rename of a fully
written directory, so a half-written one is never taken for an entry; this module itself is not
part of the key (it moves files, it does not decide them).

    ${CVSERVE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/cvserve}/demo-<key>/{<model>.pt, meta.json, report.json}
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# A run's records, beside its checkpoints: `training.train.cached_report` counts an output directory
# as complete only once both name the key, so they are written last.
RECORD_FILES = ("meta.json", "report.json")


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """`$CVSERVE_CACHE`, else `$XDG_CACHE_HOME/cvserve`, else `~/.cache/cvserve`."""
    if environ.get("CVSERVE_CACHE"):
        return Path(environ["CVSERVE_CACHE"]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "cvserve"


def entry_dir(cache: Path, key: str) -> Path:
    """Where the models of training key `key` live in `cache` (whether or not they are there yet)."""
    return cache / f"demo-{key}"


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary file in the target's directory and one rename."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def restore(cache: Path, key: str, out: Path, checkpoints: Sequence[str]) -> bool:
    """Copy the cached `checkpoints` and records of `key` into `out` if `cache` has them; say if it did.

    `out`'s old records go first and the new ones are copied last, so an interrupted copy leaves `out`
    without a complete run (the next run restores or trains again), never with a mixed one.
    """
    entry = entry_dir(cache, key)
    names = (*checkpoints, *RECORD_FILES)
    if not all((entry / name).is_file() for name in names):
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:  # `out` stops counting as a complete run until the copy is done
        (out / name).unlink(missing_ok=True)
    for name in names:
        _copy_atomically(entry / name, out / name)
    log.info("copied the demo models of training key %s from %s", key, entry)
    return True


def store(out: Path, cache: Path, key: str, checkpoints: Sequence[str]) -> Path:
    """Put the complete run in `out` (`checkpoints` and records) into `cache` as the entry of `key`,
    atomically; return the entry.

    The files are copied into a temporary directory beside the entry, which is then renamed to it:
    readers see no entry or a whole one. When another process stored the same key first, its entry
    stays (same key, same training) and this copy is dropped.
    """
    entry = entry_dir(cache, key)
    if entry.is_dir():
        return entry
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".demo-{key}.", suffix=".partial", dir=cache))
    try:
        for name in (*checkpoints, *RECORD_FILES):
            shutil.copyfile(out / name, staging / name)
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
            log.info("%s was stored meanwhile by another run; keeping it", entry)
            return entry
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("stored the demo models of training key %s in %s", key, entry)
    return entry
