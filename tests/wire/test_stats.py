"""The run's counting definitions: percentiles and sequence gaps."""

from __future__ import annotations

from pipeline.wire.stats import SequenceGaps, percentiles


def test_sequence_gaps_per_stream() -> None:
    gaps = SequenceGaps()
    assert gaps.see("a", 5) == 0  # joining late is not a gap
    assert gaps.see("a", 6) == 0
    assert gaps.see("a", 9) == 2  # 7 and 8 missed
    assert gaps.see("b", 0) == 0  # streams are counted apart
    assert gaps.see("a", 3) == -7  # went back (a restarted stream): a new baseline
    assert gaps.see("a", 4) == 0
    gaps.forget("a")
    assert gaps.see("a", 0) == 0


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) is None
    assert percentiles(range(1, 101)) == {"median": 50.5, "p95": 95}
    assert percentiles([3.0, 1.0, 2.0]) == {"median": 2.0, "p95": 3.0}
