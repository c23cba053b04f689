"""Prompt commands: checked and answered at once, from any thread; applied between frames.

The control socket's thread hands each command to `CommandQueue.answer` while the tracker's
own thread may be in the middle of a frame. A command is checked against the tracker as it
will be when the command applies: its state after the last finished frame (the `Roster` the
tracker hands over after each frame) plus the commands queued before it. A good one is
queued and answered with the frame it takes effect on; the tracker applies
every queued command, in order, before its next frame (`PromptTracker.step`). So no command
changes a frame in progress, and only the tracker's thread touches a track: this side holds
ids and listing rows only, behind one lock.

What a frame does to a tracker keeps every queued command good: it moves ids from running
or pending to lost, never back, and frees room. The one check a frame can still fail is the
frame size's, while the tracker has seen no frame yet: a prompt outside the first frame is
then reported lost at its start frame (state "lost", empty mask) instead of refused. A
queued prompt keeps its place across a resolution change: it is applied first, and then
rescaled with the tracks, so a box inside the old frame is inside the new one. (A frame
whose decoder fails and that is tried again takes the commands that came during the failed
try, although they were answered with the frame after it.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.prompts import check_box, check_points, overlaps_frame, points_inside
from pipeline.track.kalman import Box
from pipeline.wire.masks import is_int
from pipeline.wire.messages import (
    MAX_TRACK_ID,
    PromptCommand,
    PromptReply,
    TrackListing,
    TrackState,
)

MAX_TRACKS_AT_ONCE = 4096
"""Tracks and pending prompts a tracker holds at one time; an add past it is refused. A
frame's masks message describes every track in its header (about 200 bytes each), and a
header is at most ``messages.MAX_HEADER_BYTES`` (1 MiB, some 5000 tracks): past that the
next node would reject the frame's masks."""

MAX_COMMANDS_AT_ONCE = 10_000
"""Commands waiting for the tracker's next frame; past it a command is refused until that
frame. So a flood of commands holds a frame back by applying at most this many first (some
milliseconds); well above MAX_TRACKS_AT_ONCE, so every object can be added before the first
frame."""


@dataclass(frozen=True)
class Prompt:
    """A checked prompt, in pixels of the frame size it was checked against."""

    box: Box | None  # as given; clipped to the frame when it starts
    # (K, 2) float32 x/y pixels and (K,) int32 labels (1 foreground, 0 background), as the
    # mask decoder takes them
    points: tuple[np.ndarray, np.ndarray] | None
    frame: int | None = None  # the first frame index it may start at; None: the next frame

    def rescaled(self, sx: float, sy: float) -> Prompt:
        """The same prompt in a frame resized by ``sx`` (x) and ``sy`` (y)."""
        box, points = self.box, self.points
        if box is not None:
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        if points is not None:
            points = ((points[0] * np.array([sx, sy])).astype(np.float32), points[1])
        return Prompt(box, points, self.frame)

    def fits(self, frame_size: tuple[int, int]) -> bool:
        """Whether it passes ``CommandQueue.add``'s frame check at this (H, W) size: one
        queued before the tracker knew its frame size is checked when it is due."""
        return (self.box is None or overlaps_frame(self.box, frame_size)) and (
            self.points is None or bool(points_inside(self.points[0], frame_size).all())
        )


@dataclass(frozen=True)
class Change:
    """One checked command, for the tracker to apply before its next frame.

    op "add": ``prompt`` waits under ``track_id`` for its start frame; "update": the box of
    ``prompt`` corrects that id (a running track restarts there, a pending prompt takes it,
    a lost track comes back as a new prompt at it); "remove" (``prompt`` None): the id is
    forgotten.
    """

    op: Literal["add", "update", "remove"]
    track_id: int
    prompt: Prompt | None


def pending_row(track_id: int, prompt: Prompt) -> TrackListing:
    """The listing row of a prompt that has not started yet."""
    return {
        "track_id": track_id,
        "state": TrackState.TENTATIVE,
        "box": None if prompt.box is None else [float(v) for v in prompt.box],
        "score": 0.0,
        "frames_since_update": 0,
        "pending": True,
        "start_frame": prompt.frame,
    }


@dataclass
class Roster:
    """What commands are checked against: a tracker's ids and listing rows, no filters.

    rows: the listing row of every track and pending prompt, by id (rows are replaced, never
        changed in place: a reply may still hold one); lost: ids reported lost, which an
        update brings back; next_id: the next id never given out; frame_size: (H, W), None
        before the first frame; next_frame: the first frame index a command made now alters.
    """

    rows: dict[int, TrackListing] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    next_id: int = 1
    frame_size: tuple[int, int] | None = None
    next_frame: int = 0

    def record(self, change: Change) -> None:
        """What a checked change does to the ids and rows."""
        tid = change.track_id
        self.lost.discard(tid)
        if change.prompt is None:  # remove
            self.rows.pop(tid, None)
            return
        row = self.rows.get(tid)
        if change.op == "update" and row is not None and change.prompt.box is not None:
            self.rows[tid] = {**row, "box": [float(v) for v in change.prompt.box], "pending": True}
        else:
            self.rows[tid] = pending_row(tid, change.prompt)
            self.next_id = max(self.next_id, tid + 1)


class CommandQueue:
    """Prompt commands from any thread, queued for the tracker's; see the module docs.

    The checks (``add``, ``update``, ``remove``) raise ValueError naming the problem and
    change nothing; a good command is queued.
    """

    def __init__(self, roster: Roster) -> None:
        self._lock = threading.RLock()  # ``answer`` holds it across a check and its reply
        self._roster = roster
        self._queued: list[Change] = []

    # -- any thread ------------------------------------------------------------------------

    def add(
        self,
        box: Sequence[float] | np.ndarray | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        track_id: int | None = None,
        frame: int | None = None,
    ) -> int:
        """Queue a new object; returns its track id.

        box: ``(x1, y1, x2, y2)`` pixels; partly outside the frame is clipped.
        points/labels: (K, 2) x/y pixels and K labels (1 foreground, 0 background; None:
            every point foreground), used with the box on the first frame only (the object
            moves away from them afterwards). A points-only prompt starts the filter from its
            first mask's box.
        track_id: a specific id (1..MAX_TRACK_ID) not in use; default: the next never-used
            id (past MAX_TRACK_ID: ValueError "track id limit reached", nothing changed).
        frame: first frame index to apply it at; default the next frame.
        """
        if box is None and points is None:
            raise ValueError("prompt needs a box or points, got neither")
        if frame is not None and (not is_int(frame) or frame < 0):
            raise ValueError(f"frame must be a frame index >= 0, got {frame!r}")
        with self._lock:
            size = self._roster.frame_size
            checked_box = None if box is None else check_box(box, "box", size)
            checked_points = None
            if points is not None or labels is not None:
                checked_points = check_points(points, labels, "points", size)
                if checked_box is None and not np.any(checked_points[1] == 1):
                    raise ValueError(
                        "points-only prompt needs at least one foreground point (label 1)"
                    )
            self._check_room()
            new_id = self._new_id(track_id)
            start = None if frame is None else int(frame)
            return self._queue("add", new_id, Prompt(checked_box, checked_points, start))

    def update(self, track_id: int | None, box: Sequence[float] | np.ndarray | None) -> int:
        """Queue a correction of an object's box; returns its id. At the next frame the
        filter restarts there (same id, hits and state); a pending prompt takes the box; a
        lost track comes back under its id, as a new prompt at that box."""
        with self._lock:
            self._check_known(track_id)
            checked = check_box(box, "box", self._roster.frame_size)
            if track_id in self._roster.lost:
                self._check_room()
            return self._queue("update", int(track_id), Prompt(checked, None))  # type: ignore[arg-type]

    def remove(self, track_id: int | None) -> int:
        """Queue forgetting a track, pending prompt or lost track (it is not reported
        again); returns its id."""
        with self._lock:
            self._check_known(track_id)
            return self._queue("remove", int(track_id), None)  # type: ignore[arg-type]

    def listing(self) -> list[TrackListing]:
        """Tracks and pending prompts as plain data (JSON-ready), sorted by id: the tracker
        after its last finished frame with the queued commands applied.

        Keys: track_id, state, box (None for a pending points-only prompt), score,
        frames_since_update, pending (True for a prompt or correction that no frame has
        run yet: an add until its start frame), start_frame.
        """
        with self._lock:
            return sorted(self._roster.rows.values(), key=lambda row: row["track_id"])

    def answer(self, command: PromptCommand) -> PromptReply:
        """A control-socket command checked and queued, and its reply: the track id, the
        first frame it changes (for "list": the frame the listing leads into) and the
        listing after it. A refused command changes nothing."""
        try:
            with self._lock:  # the frame and listing are those of this command
                track_id = command.track_id
                if command.op == "add":
                    track_id = self.add(
                        command.box,
                        command.points,
                        command.labels,
                        track_id=command.track_id,
                        frame=command.frame,
                    )
                elif command.op == "update":
                    self.update(command.track_id, command.box)
                elif command.op == "remove":
                    self.remove(command.track_id)
                frame = max(command.frame or 0, self._roster.next_frame)
                tracks = tuple(self.listing())
        except ValueError as err:
            return PromptReply(ok=False, error=str(err))
        return PromptReply(ok=True, track_id=track_id, frame=frame, tracks=tracks)

    # -- the tracker's thread --------------------------------------------------------------

    def take(
        self, *, next_frame: int | None = None, frame_size: tuple[int, int] | None = None
    ) -> list[Change]:
        """Every queued command, in order, for the tracker to apply now. ``next_frame``: the
        tracker begins the frame before it, so a command from now on alters that one on;
        ``frame_size``: commands from now on are in pixels of this size (the tracker is
        rescaling its tracks and what it takes here to it)."""
        with self._lock:
            taken, self._queued = self._queued, []
            if next_frame is not None:
                self._roster.next_frame = next_frame
            if frame_size is not None:
                self._roster.frame_size = frame_size
            return taken

    def settle(self, roster: Roster) -> None:
        """The tracker's own state after a frame (or a change between frames): commands are
        checked against it from now on, with those queued meanwhile recorded on it."""
        with self._lock:
            for change in self._queued:
                roster.record(change)
            self._roster = roster

    # -- checks, under the lock ------------------------------------------------------------

    def _queue(
        self, op: Literal["add", "update", "remove"], track_id: int, prompt: Prompt | None
    ) -> int:
        if len(self._queued) >= MAX_COMMANDS_AT_ONCE:
            raise ValueError(
                f"too many commands waiting for the next frame ({MAX_COMMANDS_AT_ONCE}): "
                "send this one again after it"
            )
        change = Change(op, track_id, prompt)
        self._roster.record(change)
        self._queued.append(change)
        return track_id

    def _new_id(self, track_id: object) -> int:
        if track_id is None:
            if self._roster.next_id > MAX_TRACK_ID:
                raise ValueError(
                    f"track id limit reached: ids 1..{MAX_TRACK_ID} are used up (ids are never "
                    "reused; an add with an explicit free track_id still works)"
                )
            return self._roster.next_id
        if not is_int(track_id) or not 1 <= track_id <= MAX_TRACK_ID:  # type: ignore[operator]
            raise ValueError(f"track_id must be an integer in 1..{MAX_TRACK_ID}, got {track_id!r}")
        if track_id in self._roster.rows:
            raise ValueError(f"track_id {track_id} is already in use")
        return int(track_id)  # type: ignore[call-overload]

    def _check_room(self) -> None:
        held = len(self._roster.rows)
        if held >= MAX_TRACKS_AT_ONCE:
            raise ValueError(
                f"too many tracks at once: {held} tracks and prompts, at most "
                f"{MAX_TRACKS_AT_ONCE} (one frame's masks message holds no more); remove some"
            )

    def _check_known(self, track_id: object) -> None:
        roster = self._roster
        if not (is_int(track_id) and (track_id in roster.rows or track_id in roster.lost)):
            raise ValueError(f"unknown track id {track_id!r}")
