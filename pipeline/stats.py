"""The run's one definition of its summary statistics (status, run summary, bench)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """Median and 95th percentile (nearest rank), or None without values."""
    ordered = sorted(values)
    if not ordered:
        return None
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": round(statistics.median(ordered), 3), "p95": round(p95, 3)}
