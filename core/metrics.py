"""The metric contract's shared part: how per-sample scores become a benchmark's numbers when a
metric does not say otherwise (``aggregate``)."""

from __future__ import annotations

import math


def mean_aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the rows that have it (None and NaN/inf values are skipped)."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and math.isfinite(float(r[k]))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out
