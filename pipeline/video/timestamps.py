"""Strictly increasing presentation timestamps out of what real files and cameras give.

Decoded frames of real-world files do not always have increasing pts: an AVI with packed
B-frames (OpenCV's Megamind.avi) or an MP4 whose writer stored pts == dts for B-frames hands
out reordered pts, while their dts increase; raw streams and damaged MPEG-TS have no pts at
all; concatenated files jump back at the junction. `TimestampRepairer` turns such input into
one strictly increasing timeline, and leaves well-formed input exactly as it is.

It chooses between pts and dts the way FFmpeg's best-effort timestamp does (libavcodec's
``guess_correct_pts``): it counts the faults of each (a value not after the previous one) and
trusts pts while it has no more faults than dts. Unlike FFmpeg it can decide with a look-ahead,
counting the faults of the next few frames too, so a file whose pts go wrong at frame 3 uses
dts from frame 3 on instead of emitting one bad pts before it notices. Whatever it chose is
then guarded: a value not after the previous output is moved after it.

`Timeline` is the other half: one timeline over pieces of a stream whose own pts restart (a
camera's reconnect, a restarted decoder), each piece shifted to follow the last frame before it
by the wall-clock time in between.

Both are pure logic on plain numbers (no PyAV), so they are tested with number sequences; the
frames the repairer is handed travel through it as opaque items.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Generic, TypeVar

# How a repaired timestamp was made, as counted in `TimestampRepairer.report`:
# "dts": the frame's dts, because its pts is missing or the pts are out of order;
# "frame_rate": neither exists, so one frame duration after the previous frame;
# "nudged": the value was not after the previous output, so it is moved one tick after it;
# "discontinuity": the timeline jumped back (a concatenation), so this frame and the rest are
# shifted to continue one frame duration after the last frame before the jump.
REPAIR_METHODS = ("dts", "frame_rate", "nudged", "discontinuity")

ItemT = TypeVar("ItemT")


@dataclass(frozen=True)
class RepairedTimestamp(Generic[ItemT]):
    """One frame's timestamp after repair.

    Attributes:
        item: what was pushed with the timestamps (the decoded frame), unchanged.
        index: 0-based position in push order.
        pts: the repaired pts: strictly greater than the previous frame's.
        source_pts: the pts the frame came with (None when it had none).
        method: one of `REPAIR_METHODS` when ``pts`` differs from ``source_pts``, else None.
        reason: a sentence saying why, for a log line (None when not repaired).
    """

    item: ItemT
    index: int
    pts: int
    source_pts: int | None
    method: str | None = None
    reason: str | None = None

    @property
    def repaired(self) -> bool:
        """True when ``pts`` is not the pts the frame came with."""
        return self.method is not None


class TimestampRepairer(Generic[ItemT]):
    """Makes a frame sequence's pts strictly increasing; well-formed pts pass unchanged.

    Frames are pushed in decode-output order with their pts and dts (None where missing) and
    come back, in the same order, as `RepairedTimestamp`s: at once without look-ahead, else
    once ``lookahead`` newer frames have been pushed (`drain` hands out the rest at the end).

    For each frame, in order of preference:

    1. its pts, when it has one and the pts so far (look-ahead included) have had no more
       faults than the dts, or the frame has no dts;
    2. else its dts, when it has one;
    3. else the previous output plus one frame duration (0 for a first frame).

    A value not after the previous output is a jump back by more than ``discontinuity_ticks``
    (the timeline restarted: the rest is shifted to continue one frame duration after the
    previous output) or a small step back (moved to one tick after the previous output).
    One exception, where this differs from FFmpeg: a frame without dts in a stream that has
    dts, and whose pts have more faults than its dts, brings a pts that is as good as none, so
    when that pts is not after the previous output the frame is placed one frame duration
    after it instead (the last frames of a reordered file keep their spacing).
    Forward jumps are kept: they are variable frame rate, or a real gap.
    """

    def __init__(
        self, *, frame_duration: int, discontinuity_ticks: int, lookahead: int = 0
    ) -> None:
        """``frame_duration``: one frame's duration in pts ticks, used where a frame brings
        none of its own. ``discontinuity_ticks``: a jump back by more ticks than this is a
        restart of the timeline (about a second; a restart by less, as when clips shorter than
        that are joined, comes out nudged, a tick apart, until the timestamps pass the previous
        output again). ``lookahead``: how many frames
        to hold back so that their faults count too (0: decide at once, for live sources)."""
        if frame_duration < 1:
            raise ValueError(f"frame_duration must be >= 1 tick, got {frame_duration}")
        if discontinuity_ticks < 1:
            raise ValueError(f"discontinuity_ticks must be >= 1, got {discontinuity_ticks}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 frames, got {lookahead}")
        self.discontinuity_ticks = discontinuity_ticks
        self.lookahead = lookahead
        self._pending: deque[tuple[ItemT, int | None, int | None, int | None]] = deque()
        # Fault counts as in FFmpeg's guess_correct_pts, over every frame pushed so far.
        self._faulty_pts = 0
        self._faulty_dts = 0
        self._last_pts_seen: int | None = None
        self._last_dts_seen: int | None = None
        self._dts_seen = False  # whether any frame had a dts: without, pts faults mean little
        # The output timeline.
        self._emitted = 0
        self._last_out: int | None = None
        self._step = frame_duration  # the duration of the last frame handed out (ticks)
        self._offset = 0  # added to every chosen value since the last discontinuity
        self.first_repaired: int | None = None  # the index of the first frame repaired
        self._methods = dict.fromkeys(REPAIR_METHODS, 0)

    def push(
        self,
        item: ItemT,
        *,
        pts: int | None,
        dts: int | None,
        duration: int | None = None,
    ) -> RepairedTimestamp[ItemT] | None:
        """Add the next frame; return the oldest frame held, now that its timestamp is decided
        (None while the look-ahead fills). ``duration``: the frame's own duration in ticks,
        when the container gives one."""
        self._count_faults(pts, dts)
        self._pending.append((item, pts, dts, duration))
        if len(self._pending) <= self.lookahead:
            return None
        return self._emit(*self._pending.popleft())

    def drain(self) -> Iterator[RepairedTimestamp[ItemT]]:
        """The frames still held back by the look-ahead, at the end of the stream, oldest
        first; each is decided as it is taken, so a caller that stops early keeps the rest."""
        while self._pending:
            yield self._emit(*self._pending.popleft())

    @property
    def report(self) -> dict[str, Any]:
        """``{"repaired_frames": n, "first_frame": index or None, "methods": {method: n}}``,
        methods only where they were used: ``repaired_frames`` 0 and no methods when every
        frame kept its own pts."""
        return {
            "repaired_frames": sum(self._methods.values()),
            "first_frame": self.first_repaired,
            "methods": {name: n for name, n in self._methods.items() if n},
        }

    # -- the rule ----------------------------------------------------------------------------

    def _count_faults(self, pts: int | None, dts: int | None) -> None:
        """FFmpeg's bookkeeping: a value not after the previous one of its kind is a fault;
        a missing value is replaced by the other one as the reference for the next frame."""
        if dts is not None:
            self._dts_seen = True
            if self._last_dts_seen is not None and dts <= self._last_dts_seen:
                self._faulty_dts += 1
            self._last_dts_seen = dts
        elif pts is not None:
            self._last_dts_seen = pts
        if pts is not None:
            if self._last_pts_seen is not None and pts <= self._last_pts_seen:
                self._faulty_pts += 1
            self._last_pts_seen = pts
        elif dts is not None:
            self._last_pts_seen = dts

    def _emit(
        self, item: ItemT, pts: int | None, dts: int | None, duration: int | None
    ) -> RepairedTimestamp[ItemT]:
        value, method, reason = self._choose(pts, dts)
        if value == pts:  # however it was reached, the frame's own pts: nothing repaired
            method, reason = None, None
        index = self._emitted
        self._emitted += 1
        self._last_out = value
        if duration is not None and duration > 0:
            self._step = duration
        if method is not None:
            self._methods[method] += 1
            if self.first_repaired is None:
                self.first_repaired = index
        return RepairedTimestamp(
            item=item, index=index, pts=value, source_pts=pts, method=method, reason=reason
        )

    def _choose(self, pts: int | None, dts: int | None) -> tuple[int, str | None, str | None]:
        """The frame's output pts, with the method and reason when it is not its own pts."""
        last = self._last_out
        use_pts = pts is not None and (dts is None or self._faulty_pts <= self._faulty_dts)
        chosen = pts if use_pts else dts
        if chosen is None:
            value = 0 if last is None else last + self._step
            return value, "frame_rate", "no pts or dts, using the frame rate"

        value = chosen + self._offset
        method: str | None = None
        reason: str | None = None
        if not use_pts:
            method = "dts"
            reason = "no pts, using dts" if pts is None else "pts out of order, using dts"
        if self._offset:
            method = "discontinuity"
            reason = "shifted by an earlier discontinuity to keep the timeline going"
        if last is None or value > last:
            return value, method, reason

        back = last - value
        if use_pts and self._dts_seen and self._faulty_pts > self._faulty_dts:
            # A frame without dts in a stream whose dts are trusted over its reordered pts
            # (the last frames of Megamind.avi): its pts is no better than none.
            reason = "no dts and pts out of order, using the frame rate"
            return last + self._step, "frame_rate", reason
        if back > self.discontinuity_ticks:
            # A restart (concatenated files, a stream switch): keep the spacing of what
            # follows, only move it to continue where the timeline was.
            self._offset += last + self._step - value
            reason = (
                f"timestamps jumped back by {back} ticks (a concatenation or discontinuity), "
                "continuing the timeline after the previous frame"
            )
            return last + self._step, "discontinuity", reason
        reason = "timestamp not after the previous frame's, moved one tick after it"
        return last + 1, "nudged", reason


@dataclass
class Timeline:
    """One strictly increasing pts timeline, in one time base, over pieces of a stream whose
    own pts restart: a live source's connections (RTSP starts each session near 0), or the
    frames of a restarted decoder after those of the one before.

    A piece's first frame is placed after the last frame before it by the wall-clock time
    between their captures (at least one tick), so an outage shows as a gap of its real
    length; the piece's later frames keep their own spacing from there. A frame that would
    not come after the previous one (a camera's clock stepped back) is moved one tick after
    it. Without a frame before (``last_pts`` None), the first piece starts at 0.

    Attributes:
        time_base: the timeline's unit in seconds (None: the first frame's).
        last_pts: the last frame's place on the timeline (None: no frame yet).
        last_capture: its capture time, ``time.time()`` seconds.
    """

    time_base: Fraction | None = None
    last_pts: int | None = None
    last_capture: float = 0.0
    # The current piece's first pts and its place on the timeline (None: a piece starts).
    _origin: tuple[int, int] | None = field(default=None, init=False)

    def new_piece(self) -> None:
        """The next frame starts a piece: its pts restart, it is placed by the wall clock."""
        self._origin = None

    def place(self, pts: int, time_base: Fraction, capture_time: float) -> int:
        """The timeline's pts for a frame of the current piece (``pts`` in ``time_base``)."""
        self.time_base = self.time_base or time_base
        if self._origin is None:
            start = 0
            if self.last_pts is not None:
                gap = Fraction(max(0.0, capture_time - self.last_capture))
                start = self.last_pts + max(1, round(gap / self.time_base))
            self._origin = (pts, start)
        first, start = self._origin
        placed = start + round((pts - first) * time_base / self.time_base)
        if self.last_pts is not None:
            placed = max(placed, self.last_pts + 1)
        self.last_pts, self.last_capture = placed, capture_time
        return placed
