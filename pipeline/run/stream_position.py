"""Where a live stream stands, kept across a decoder restart.

A decoder that dies in a live run is started again by the launcher, the other nodes running
on. The new process would number its frames from 0 again: sequence numbers and frame indices
would repeat (PNGs overwritten, consumers told of a stream going back) and timestamps jump
back. So the decoder records, after every frame it sends, that frame's FrameMeta (its
sequence number and frame index, connection number, pts and wall-clock time; `PositionFile`:
one ``pwrite`` of a few bytes, which a SIGKILL cannot tear), and a restarted decoder continues
from there (`Continuation`), as `pipeline.video.live_source.LiveSource` does after a reconnect,
with the same `pipeline.video.timestamps.Timeline`: a new session, its pts rebased to follow
the last frame by the wall time in between.
"""

from __future__ import annotations

import math
import os
import struct
from fractions import Fraction
from pathlib import Path

import msgspec

from pipeline.video.timestamps import Timeline
from pipeline.wire.messages import FrameMeta

# seq, frame_index, session, has_pts, pts, time_base num / den, capture_time
_LAYOUT = struct.Struct("<qqqqqqqd")


class PositionFile:
    """A file holding the FrameMeta of a stream's last frame sent, rewritten in place after
    every frame (less the stream id, which the decoder knows, and source_pts)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def read(self, stream_id: str) -> FrameMeta | None:
        """The last frame a previous decoder of ``stream_id`` sent, or None (no file: this
        is the first one). Raises ValueError for a file that is not a position (a run
        directory is private to its launcher: that would be a bug, not something to continue
        from)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != _LAYOUT.size:
            raise ValueError(f"{self.path} is not a stream position ({len(data)} bytes)")
        seq, index, session, has_pts, pts, num, den, capture = _LAYOUT.unpack(data)
        if min(seq, index, session) < 0 or num <= 0 or den <= 0 or not math.isfinite(capture):
            raise ValueError(f"{self.path} holds an impossible stream position")
        pts = pts if has_pts else None
        return FrameMeta(stream_id, seq, index, pts, (num, den), capture, session=session)

    def write(self, meta: FrameMeta) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        # The fields in the record's order (`_LAYOUT`), with a flag for a missing pts.
        _, seq, index, pts, (num, den), capture, session, _ = msgspec.structs.astuple(meta)
        record = _LAYOUT.pack(seq, index, session, pts is not None, pts or 0, num, den, capture)
        os.pwrite(self._fd, record, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Continuation:
    """Renumbers a restarted decoder's frames to follow ``after``, the last frame the old
    process sent: sequence numbers and frame indices go on, every session of the new process
    comes after the old one's, and pts continue on the old one's `Timeline` (in its time base,
    the new process's frames one piece placed after the last old frame by the wall time)."""

    def __init__(self, after: FrameMeta) -> None:
        self.after = after
        self._first: FrameMeta | None = None  # the new process's first frame
        self._timeline: Timeline | None = None
        if after.pts is not None:  # else there is no timeline to continue: pts stay the new ones
            tick = Fraction(*after.time_base)
            self._timeline = Timeline(tick, last_pts=after.pts, last_capture=after.capture_time)

    def apply(self, meta: FrameMeta) -> FrameMeta:
        after = self.after
        if self._first is None:
            self._first = meta
        first = self._first
        pts, time_base = meta.pts, meta.time_base
        if self._timeline is not None and meta.pts is not None:
            pts = self._timeline.place(meta.pts, Fraction(*meta.time_base), meta.capture_time)
            time_base = after.time_base
        return msgspec.structs.replace(
            meta,
            seq=after.seq + 1 + meta.seq - first.seq,
            frame_index=after.frame_index + 1 + meta.frame_index - first.frame_index,
            session=after.session + 1 + meta.session - first.session,
            pts=pts,
            time_base=time_base,
        )
