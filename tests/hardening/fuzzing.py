"""What every fuzz test here shares: hypothesis settings, the committed replay database, and byte mutations.

* A fixed number of examples per test (`max_examples`), no deadline and no time budget: a run does the same
  amount of work on a fast and a slow machine.
* The replay database `tests/hardening/.hypothesis-db` is committed: hypothesis writes a failing example
  there and replays it first on every later run, until it passes. A passing run writes nothing.
* A failure prints the blob that reproduces it (`print_blob`, `@reproduce_failure(...)`); the examples of a
  whole run are fixed with pytest's `--hypothesis-seed=<n>`.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

REPLAY_DATABASE = DirectoryBasedExampleDatabase(Path(__file__).resolve().parent / ".hypothesis-db")


def fuzz_settings(max_examples: int) -> settings:
    """`max_examples` examples, replayed failures first, no deadline, the reproducing blob printed."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=REPLAY_DATABASE,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_edits: int = 6, random_share: int = 10) -> bytes:
    """One of `seeds` with a few bytes overwritten, inserted or deleted (and maybe cut short); or, one time
    in `random_share`, random bytes."""
    if draw(st.integers(0, random_share - 1)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_edits))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["set", "insert", "delete"]))
        if kind == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    if draw(st.booleans()) and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def header_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """What an HTTP header value can carry to the server: latin-1 text without controls (so '²' too), no
    whitespace around it (the client refuses that before sending)."""
    characters = st.characters(codec="latin-1", exclude_categories=("Cc", "Zl", "Zp"))
    return st.text(characters, max_size=max_size).map(str.strip)
