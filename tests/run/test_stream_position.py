"""A restarted decoder continues the stream: numbering, sessions and timestamps go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.run.stream_position import Continuation, PositionFile, StreamPosition
from pipeline.wire.messages import FrameMeta


def meta(
    seq: int, pts: int | None, capture: float, *, session: int = 0, tb=(1, 90000)
) -> FrameMeta:
    return FrameMeta(
        stream_id="cam0",
        seq=seq,
        frame_index=seq,
        pts=pts,
        time_base=tb,
        capture_time=capture,
        session=session,
    )


def test_position_file_round_trip_and_rewrite(tmp_path: Path) -> None:
    file = PositionFile(tmp_path / "decoder.position")
    assert file.read() is None  # the first decoder of a run finds none
    first = StreamPosition.after(meta(41, 3600 * 41, 1000.5, session=2))
    file.write(first)
    file.write(StreamPosition.after(meta(42, None, 1000.6)))
    file.close()
    again = PositionFile(tmp_path / "decoder.position").read()
    assert again == StreamPosition(
        next_seq=43,
        next_frame_index=43,
        session=0,
        pts=None,
        time_base=(1, 90000),
        capture_time=1000.6,
    )
    assert first.next_seq == 42 and first.pts == 3600 * 41 and first.session == 2


def test_a_file_that_is_not_a_position_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "decoder.position"
    path.write_bytes(b"not a position")
    with pytest.raises(ValueError, match="is not a stream position"):
        PositionFile(path).read()
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="impossible stream position"):
        PositionFile(path).read()


def test_continuation_follows_the_last_frame() -> None:
    # The old decoder sent seq 99 (frame 99, session 1) at pts 9000 (1/100 s), at t=500.0.
    after = StreamPosition.after(meta(99, 9000, 500.0, session=1, tb=(1, 100)))
    cont = Continuation(after)
    # The new process numbers from 0 in its own time base; its first frame comes 2.5 s
    # after the last old one, the next 40 ms later (3600 ticks of 1/90000).
    a = cont.apply(meta(0, 123_456, 502.5))
    b = cont.apply(meta(1, 123_456 + 3600, 502.54))
    c = cont.apply(meta(2, 123_456 + 3600, 502.58, session=1))  # a reconnect, same pts
    assert [m.seq for m in (a, b, c)] == [100, 101, 102]
    assert [m.frame_index for m in (a, b, c)] == [100, 101, 102]
    assert [m.session for m in (a, b, c)] == [2, 2, 3]
    assert all(m.time_base == (1, 100) for m in (a, b, c))
    assert a.pts == 9000 + 250  # the outage shows as its wall-clock length
    assert b.pts == 9000 + 250 + 4
    assert c.pts == b.pts + 1  # a clock that stood still still moves on


def test_continuation_without_timestamps_keeps_the_new_ones() -> None:
    cont = Continuation(StreamPosition.after(meta(5, None, 10.0)))
    first = cont.apply(meta(0, 77, 11.0))
    assert (first.seq, first.pts, first.time_base) == (6, 77, (1, 90000))
