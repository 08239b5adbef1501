"""The one reader of the `Accept` header: which media types a client takes, and how much it prefers each.

Every surface decides its answer's format here (MessagePack or JSON answers, annotated images,
annotated videos), so `q=0` means "not this" everywhere and the highest weight wins alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def accept_weights(headers: Mapping[str, str]) -> dict[str, float]:
    """Each media type the Accept header names (lower case), with its q weight in [0, 1] (the highest when
    named twice; an unreadable q counts as 1)."""
    weights: dict[str, float] = {}
    for item in headers.get("accept", "").split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        if not media_type:
            continue
        q = next((p.partition("=")[2] for p in params if p.replace(" ", "").lower().startswith("q=")), "1")
        try:
            weight = min(max(float(q), 0.0), 1.0)
        except ValueError:
            weight = 1.0
        if weight != weight:  # NaN
            weight = 1.0
        media_type = media_type.lower()
        weights[media_type] = max(weight, weights.get(media_type, 0.0))
    return weights


def accepted(headers: Mapping[str, str]) -> list[str]:
    """The media types the client takes (q > 0), the most wanted first (ties keep the header's order)."""
    weights = accept_weights(headers)
    return sorted((media for media, q in weights.items() if q > 0), key=lambda media: -weights[media])


def preferred(headers: Mapping[str, str], offered: Iterable[str]) -> str | None:
    """The media type of `offered` the client wants most (q > 0), or None when it names none of them."""
    offered = set(offered)
    return next((media for media in accepted(headers) if media in offered), None)
