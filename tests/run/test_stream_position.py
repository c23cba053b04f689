"""A restarted decoder continues the stream: numbering, sessions and timestamps go on."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from pipeline.run.stream_position import Continuation, PositionFile
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
    assert file.read("cam0") is None  # the first decoder of a run finds none
    file.write(meta(41, 3600 * 41, 1000.5, session=2))
    assert PositionFile(tmp_path / "decoder.position").read("cam0") == meta(
        41, 3600 * 41, 1000.5, session=2
    )
    last = msgspec.structs.replace(meta(42, None, 1000.6), source_pts=7)
    file.write(last)  # in place of the first
    file.close()
    again = PositionFile(tmp_path / "decoder.position").read("cam0")
    # The last frame's meta, less its source_pts (a continuation has no use for it).
    assert again == msgspec.structs.replace(last, source_pts=None) == meta(42, None, 1000.6)


def test_a_file_that_is_not_a_position_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "decoder.position"
    path.write_bytes(b"not a position")
    with pytest.raises(ValueError, match="is not a stream position"):
        PositionFile(path).read("cam0")
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="impossible stream position"):
        PositionFile(path).read("cam0")


def test_continuation_follows_the_last_frame() -> None:
    # The old decoder sent seq 99 (frame 99, session 1) at pts 9000 (1/100 s), at t=500.0.
    cont = Continuation(meta(99, 9000, 500.0, session=1, tb=(1, 100)))
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
    cont = Continuation(meta(5, None, 10.0))
    first = cont.apply(meta(0, 77, 11.0))
    assert (first.seq, first.pts, first.time_base) == (6, 77, (1, 90000))
