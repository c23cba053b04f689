"""The run's one definition of its summary statistics (status, run summary, bench)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

# Values kept for the statistics (the most recent: a node's per-message times, a live run's
# frames): sorted at every status message, so small enough to cost about a millisecond,
# large enough for a stable p95.
WINDOW = 10_000


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """Median and 95th percentile (nearest rank), or None without values."""
    ordered = sorted(values)
    if not ordered:
        return None
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": round(statistics.median(ordered), 3), "p95": round(p95, 3)}


class SequenceGaps:
    """Sequence numbers missed per stream (``FrameMeta.seq`` counts 0, 1, 2, ... per stream
    id): the nodes' input gaps and a subscriber's missed messages, one definition.

    The first message of a stream sets the baseline (joining late is not a gap); a number
    that goes back (a restarted stream) sets it again.
    """

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def see(self, stream_id: str, seq: int) -> int:
        """Numbers skipped right before ``seq``: > 0 missed, 0 in order, < 0 went back."""
        expected = self._next.get(stream_id)
        self._next[stream_id] = seq + 1
        return 0 if expected is None else seq - expected

    def forget(self, stream_id: str) -> None:
        """The stream ended: its next message starts a new baseline."""
        self._next.pop(stream_id, None)
