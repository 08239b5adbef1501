"""The one exception the export raises for bad input; the CLI prints it as a single line."""

from __future__ import annotations


class ExportError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""
