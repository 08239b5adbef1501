"""Scene seeds for tests, derived from the evaluation seed base: no test scene was trained on or evaluated.

Training renders seeds below `EVAL_SEED_BASE` (every run, see `training.data.train_seeds`); the held-out
evaluation renders `EVAL_SEED_BASE + [0, eval_images)`. Tests start a million seeds further up.
"""

from __future__ import annotations

from training.data import EVAL_SEED_BASE

FRESH_SEED_BASE = EVAL_SEED_BASE + 10**6


def fresh_seeds(count: int, offset: int = 0) -> range:
    """`count` seeds from `FRESH_SEED_BASE + offset`: scenes neither training nor evaluation renders."""
    if count < 0 or offset < 0:
        raise ValueError(f"count {count} and offset {offset} must not be negative")
    return range(FRESH_SEED_BASE + offset, FRESH_SEED_BASE + offset + count)
