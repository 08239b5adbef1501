"""docs/ERRORS.md documents every error code and status the gateway can send."""

from __future__ import annotations

import re
from pathlib import Path

from service.core.errors import ERROR_KINDS

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> set[tuple[int, str]]:
    rows = re.findall(r"^\| (\d{3}) \| `(\w+)` \|", (ROOT / "docs/ERRORS.md").read_text(), flags=re.MULTILINE)
    return {(int(status), code) for status, code in rows}


def _raised_in_service() -> set[tuple[int, str]]:
    """(status, code) of every ApiError raised and every ImageError class in service/."""
    found = set()
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        found |= {
            (int(s), c) for s, c in re.findall(r'ApiError\(\s*(?:#[^\n]*\n\s*)?(\d{3}),\s*"(\w+)"', text)
        }
        found |= {(int(s), c) for s, c in re.findall(r'status_code = (\d{3})\n\s+code = "(\w+)"', text)}
    return found


def test_every_raised_code_is_documented() -> None:
    raised = _raised_in_service()
    assert len(raised) >= 10, raised  # the scan still finds the gateway's errors
    assert raised - _documented() == set()


def test_every_generic_status_kind_is_documented() -> None:
    documented = _documented()
    for status in ERROR_KINDS:
        if status in (400, 422, 401, 404, 405, 500, 503, 504):
            assert any(s == status for s, _ in documented), status
    assert (504, "timeout") in documented and (503, "overloaded") in documented
