"""`gooddrag bench` and `gooddrag score` (placeholders until the evaluation lands)."""

from __future__ import annotations

from gooddrag.core.errors import GoodDragError


def bench() -> None:
    """(not implemented yet) Edit and score every sample of a benchmark."""
    raise GoodDragError("'gooddrag bench' is not implemented in this version; use 'gooddrag edit'")


def score() -> None:
    """(not implemented yet) Score a folder of results against a benchmark."""
    raise GoodDragError("'gooddrag score' is not implemented in this version; use 'gooddrag edit'")
