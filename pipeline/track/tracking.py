"""Prompt tracker: one Kalman-filtered box per object, masks from an injected SAM decoder.

Pure logic, no sockets and no torch: the tracker node feeds it frames and control commands,
and the mask decoder (MobileSAM's prompt encoder + mask decoder on one frame's embedding) is
passed in as a callable, so tests can script it.

Per frame (``PromptTracker.step``):

0. the prompt commands queued since the last frame are applied, in order (``commands``:
   they are checked and answered at once, from any thread, and never change a frame in
   progress);
1. prompts whose start frame has come become tracks;
2. every track's Kalman filter predicts its box (constant velocity, SORT-style state
   ``[cx, cy, w, h, vcx, vcy, vw, vh]``, all in original-frame pixels and pixels per frame);
3. ONE decoder call for all tracks: the predicted box, clipped to the frame, as box prompt,
   plus the previous low-res mask logits as mask prompt when the last measurement was trusted;
4. the measurement is the box of the connected components of each track's own mask that
   agree with the prediction (``measure_box``: a stray fragment elsewhere in the frame does
   not stretch it). It is trusted when the decoder's predicted IoU score is at least
   ``min_score`` and it agrees with the prediction (box IoU >= ``min_agreement``); a trusted
   measurement updates the filter, an untrusted one (occlusion, distractor, empty mask) makes
   the track coast on its prediction;
5. a track that coasts for more than ``max_coast_frames`` frames, or whose prediction leaves
   the frame, is reported once as LOST and dropped;
6. when the decoder reports contested pixels (pixels two or more masks claim, with their
   logits), the published masks are made exclusive (``exclusive_masks``): each such pixel
   goes to one track, so an instance-id PNG and per-track RLE masks say the same thing.

Its parts: ``kalman`` (boxes, the Kalman track), ``measure`` (``measure_box``), ``exclusive``
(what the decoder answers, exclusive masks), ``commands`` (prompt commands, queued),
``prompts`` (prompt checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from pipeline.config import RunConfig, TrackerConfig, validate_config
from pipeline.prompts import overlaps_frame
from pipeline.track.commands import CommandQueue, Prompt, Roster, pending_row
from pipeline.track.exclusive import (
    ContestedPixels,
    DecodedMasks,
    Embedding,
    MaskDecoderFn,
    checked_decoded,
    exclusive_masks,
)
from pipeline.track.kalman import Box, Track, as_box, box_iou, clip_box
from pipeline.track.measure import measure_box
from pipeline.wire.masks import RegionMask, frame_size_of, is_int
from pipeline.wire.messages import TrackRecord, TrackState

# The class of a track's mask in exclusive_masks (``_exclusive`` says why);
# the trusted states are 0, first.
_PRIORITY = {TrackState.LOST: -1, TrackState.COASTING: 1}

# A track's figures that a snapshot keeps beside its filter, and their types.
_SAVED: dict[str, type] = {
    "last_frame": int,
    "restarted": bool,
    "hits": int,
    "frames_since_update": int,
    "last_score": float,
    "last_innovation": float,
}


@dataclass(frozen=True)
class TrackOutput:
    """What the tracker publishes for one track and one frame: its record, as the wire
    carries it (``MaskMessage.tracks``), and its mask.

    record.box: the measured box when the measurement was trusted, else the prediction
        clipped to the frame (a track that left the frame reports its unclipped prediction).
    record.score: the decoder's predicted IoU score this frame (0.0 when not decoded).
    record.innovation: Mahalanobis distance of the latest measured box from the prediction
        (kept from the previous frame when this frame's mask was empty).
    mask: the (H, W) bool mask as a RegionMask (its window; ``numpy.asarray`` or ``dense()``
        gives the full frame). A COASTING track still publishes the decoder's mask for its
        predicted box (the state says not to trust it); a LOST track publishes an empty mask
        once and is then dropped. With exclusive masks (the decoder reports contested
        pixels) no pixel is in two tracks' masks of one frame.
    """

    record: TrackRecord
    mask: RegionMask = field(repr=False, compare=False)


@dataclass
class _Slot:
    """One row of this frame's decoder batch."""

    track_id: int
    track: Track | None  # None: a prompt becoming a track this frame
    prompt: Prompt | None
    box: Box | None  # prompt box (clipped); None for points-only
    reference: Box  # what the measured parts must meet: the box, else the foreground points'
    first: bool  # no prediction to agree with: trust by score only
    dt: int


class PromptTracker:
    """Follows prompted objects from frame to frame.

    Commands go to ``commands`` (a ``CommandQueue``: ``add``, ``update``, ``remove``,
    ``listing``, ``answer`` for the control socket), from any thread, also while ``step``
    runs in another: each is checked at once (a bad one raises ValueError naming the problem
    and changes nothing) and queued. Everything else is for one thread, the tracker's, and
    applies the queued commands, in order, before it does anything: ``step``, ``lose_all``,
    ``set_frame_size``, ``snapshot``. ``step`` changes nothing but that when the decoder
    raises or returns malformed output, so a caller may retry the frame.
    """

    def __init__(
        self,
        decode: MaskDecoderFn,
        *,
        frame_size: tuple[int, int] | None = None,
        settings: TrackerConfig | None = None,
    ) -> None:
        """``frame_size`` is (H, W); None when known only at the first frame (then call
        ``set_frame_size`` before the first ``step`` that activates a prompt)."""
        if settings is not None and not isinstance(settings, TrackerConfig):
            raise TypeError(f"settings must be a TrackerConfig, got {type(settings).__name__}")
        # The gates and noise figures checked as a config file's are (a bad value names
        # its key, e.g. tracker.min_score).
        self._settings = validate_config(RunConfig(tracker=settings or TrackerConfig())).tracker
        self._decode = decode
        self._frame_size = None if frame_size is None else frame_size_of(frame_size)
        self._tracks: dict[int, Track] = {}
        self._pending: dict[int, Prompt] = {}
        self._lost: set[int] = set()  # reported lost and dropped: an update brings one back
        self._current_frame: int | None = None
        self._next_id = 1
        self.commands = CommandQueue(Roster(frame_size=self._frame_size))
        self.commands_applied = 0  # how many so far: a caller sees that they changed tracks

    @property
    def settings(self) -> TrackerConfig:
        return self._settings

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self._frame_size

    @property
    def current_frame(self) -> int | None:
        """The index of the last frame stepped into (None before the first): the next
        ``step`` needs a greater one."""
        return self._current_frame

    @property
    def tracks(self) -> Mapping[int, Track]:
        """Active tracks by id (read-only view, for the tracker's thread; pending prompts
        and queued commands are not tracks yet)."""
        return MappingProxyType(self._tracks)

    def set_frame_size(self, frame_size: tuple[int, int]) -> None:
        """Set (H, W), at the first frame or when the source changes resolution mid-stream.

        A change rescales every track (its Kalman state and covariance, ``Track.rescale``)
        and every pending prompt's box and points to the new size, as the same scene seen at
        the new resolution: the next ``step`` predicts, prompts and measures in new pixels.
        The queued commands are applied first, in the old pixels they were checked in.
        """
        new = frame_size_of(frame_size)
        self._apply_commands(frame_size=new)
        old, self._frame_size = self._frame_size, new
        if old is not None and old != new:
            sx, sy = new[1] / old[1], new[0] / old[0]
            for track in self._tracks.values():
                track.rescale(sx, sy)
            self._pending = {tid: p.rescaled(sx, sy) for tid, p in self._pending.items()}
        self._settle()

    def lose_all(self) -> list[TrackOutput]:
        """Mark every running track lost, e.g. after the camera was gone so long that the
        filters' predictions mean nothing; returns their last outputs (state "lost", empty
        masks). Pending prompts stay pending."""
        self._apply_commands()
        size = self._frame_size
        if size is None:
            return []
        outputs = [
            _lost(
                size, tid, t.predicted_box, t.frames_since_update, t.last_innovation, t.last_score
            )
            for tid, t in sorted(self._tracks.items())
        ]
        for output in outputs:
            self._drop(output.record.track_id)
        self._settle()
        return outputs

    def _apply_commands(
        self, *, next_frame: int | None = None, frame_size: tuple[int, int] | None = None
    ) -> int:
        """Apply the queued commands, in order (``CommandQueue.take`` for the arguments);
        returns how many. They were checked against this state plus those before them."""
        changes = self.commands.take(next_frame=next_frame, frame_size=frame_size)
        for change in changes:
            tid, prompt = change.track_id, change.prompt
            if prompt is None:  # remove
                self._drop(tid)
                self._lost.discard(tid)  # removed, not lost: an update does not bring it back
            elif change.op == "update" and tid in self._pending:
                self._pending[tid] = dataclasses.replace(self._pending[tid], box=prompt.box)
            elif change.op == "update" and tid in self._tracks and prompt.box is not None:
                self._tracks[tid].reset(prompt.box)
            else:  # an add, or a lost track's comeback (also one lost since the check)
                self._lost.discard(tid)
                self._pending[tid] = prompt
                self._next_id = max(self._next_id, tid + 1)
        self.commands_applied += len(changes)
        return len(changes)

    def _settle(self) -> None:
        """Hand the command side this state: it checks the commands from now on against it."""
        rows = {tid: pending_row(tid, prompt) for tid, prompt in self._pending.items()}
        for tid, track in self._tracks.items():
            rows[tid] = {
                "track_id": tid,
                "state": track.state,
                "box": [float(v) for v in track.predicted_box],
                "score": track.last_score,
                "frames_since_update": track.frames_since_update,
                "pending": track.restarted,  # corrected: the next frame runs it
                "start_frame": None,
            }
        current = self._current_frame
        roster = Roster(rows, set(self._lost), self._next_id, self._frame_size)
        roster.next_frame = 0 if current is None else current + 1
        self.commands.settle(roster)

    # ------------------------------------------------------------------ the frame

    def step(self, frame_index: int, image: Embedding | None = None) -> list[TrackOutput]:
        """Apply the queued commands, then track every object into frame ``frame_index``;
        outputs sorted by track id.

        Frame indices must increase; gaps (frames dropped in live mode) are predicted over.

        image: the frame's embedding, handed to the decoder as it is (a scripted decoder in
            tests may need none).

        A command that comes while this runs is queued for the next frame (its reply says
        ``frame_index + 1``): this frame is decoded and committed as it began.
        """
        if not is_int(frame_index) or frame_index < 0:
            raise ValueError(f"frame_index must be an integer >= 0, got {frame_index!r}")
        if self._current_frame is not None and frame_index <= self._current_frame:
            raise ValueError(
                f"frame_index must increase: got {frame_index} after {self._current_frame}"
            )
        self._apply_commands(next_frame=frame_index + 1)
        # Phase 1: build the batch without touching any track, so a failing decoder leaves
        # the tracker as it was.
        slots, rejected = self._batch(frame_index)
        size = self._frame_size
        decoded = self._decode_batch(slots, image, size) if slots and size else None
        # Phase 2: commit.
        self._current_frame = frame_index
        for out in rejected:
            self._drop(out.record.track_id)
        committed = []
        if decoded is not None:
            committed = [
                self._commit(slot, decoded, row, frame_index) for row, slot in enumerate(slots)
            ]
            # Phase 3: exclusive masks, once every track's state is known. The measurements
            # above used each track's own mask (see _commit), so this changes only what is
            # published.
            if decoded.contested is not None:
                committed = _exclusive(committed, decoded.masks, decoded.contested)
        self._settle()
        return sorted([*rejected, *committed], key=lambda out: out.record.track_id)

    def _batch(self, frame_index: int) -> tuple[list[_Slot], list[TrackOutput]]:
        """This frame's decoder rows, and the outputs of what cannot be decoded (a track
        whose prediction leaves the frame, a prompt outside it); changes nothing."""
        due = {
            tid: p for tid, p in self._pending.items() if p.frame is None or p.frame <= frame_index
        }
        size = self._frame_size
        if size is None:
            if due or self._tracks:
                raise RuntimeError(
                    "frame size is unknown: call set_frame_size((H, W)) before step()"
                )
            return [], []
        slots: list[_Slot] = []
        rejected: list[TrackOutput] = []
        for tid, track in self._tracks.items():
            dt, first = frame_index - track.last_frame, track.restarted
            predicted = track.predicted_box if first else track.peek(dt)
            if not (first or overlaps_frame(predicted, size)):
                fsu = track.frames_since_update + dt
                rejected.append(_lost(size, tid, predicted, fsu, track.last_innovation))
                continue
            box = clip_box(predicted, size)
            slots.append(_Slot(tid, track, None, box, box, first, dt))
        for tid, prompt in due.items():
            reference = prompt.box if prompt.box is not None else _points_box(prompt)
            if not prompt.fits(size):
                rejected.append(_lost(size, tid, reference))
                continue
            box = None if prompt.box is None else clip_box(prompt.box, size)
            slots.append(_Slot(tid, None, prompt, box, reference if box is None else box, True, 0))
        return slots, rejected

    def _decode_batch(
        self, slots: list[_Slot], image: Embedding | None, size: tuple[int, int]
    ) -> DecodedMasks:
        """The decoder's answer for every slot, in one call."""
        boxes = np.array(
            [s.box if s.box is not None else (np.nan,) * 4 for s in slots], dtype=np.float32
        ).reshape(len(slots), 4)
        logits: list[np.ndarray | None] = [
            s.track.last_mask_logits
            if s.track is not None and not s.first and self._settings.use_mask_prompt
            else None
            for s in slots
        ]
        points = [None if s.prompt is None else s.prompt.points for s in slots]
        # The decoder is told there are none when no prompt has points.
        decoded = self._decode(image, boxes, logits, points=points if any(points) else None)
        return checked_decoded(decoded, len(slots), size)

    def _commit(
        self, slot: _Slot, decoded: DecodedMasks, row: int, frame_index: int
    ) -> TrackOutput:
        mask: RegionMask = decoded.masks[row]
        score, logits = float(decoded.scores[row]), decoded.low_res_logits[row]
        settings, size = self._settings, mask.frame_size
        # The measurement is taken on the track's own mask, not on its exclusive share: a box
        # cut down by a neighbour's mask shrinks the filter's size, the next prompt with it,
        # and the next mask (a feedback loop that outlasts the overlap), and it would make a
        # track's filter depend on which other tracks exist. SAM 2 likewise keeps overlapping
        # masks for its memory and applies the non-overlap rule to its output only. Only the
        # components that agree with the box prompt count (the prediction; on a first frame
        # the prompt box, or the foreground points): a stray fragment does not move the box.
        measured = measure_box(mask, slot.reference)
        track = slot.track
        if track is None:
            start = slot.box if slot.box is not None else measured
            if start is None:  # points-only prompt and nothing segmented: nothing to follow
                self._drop(slot.track_id)
                return _lost(
                    size, slot.track_id, slot.reference, frames_since_update=1, score=score
                )
            track = Track(start, settings=settings)
            self._tracks[slot.track_id] = track
            self._pending.pop(slot.track_id, None)
        elif not slot.first:
            track.predict(slot.dt)
        track.restarted, track.last_frame = False, frame_index
        predicted = clip_box(track.predicted_box, size)

        trusted = (
            measured is not None
            and score >= settings.min_score
            and (slot.first or box_iou(predicted, measured) >= settings.min_agreement)
        )
        track.last_score = score
        if trusted and measured is not None:  # trusted implies measured: for the type checker
            track.update(measured)
            track.last_mask_logits = _frozen(logits)
            track.state = (
                TrackState.TRACKED
                if track.hits >= settings.confirm_frames
                else TrackState.TENTATIVE
            )
            reported = measured
        else:
            if measured is not None:
                track.last_innovation = track.innovation(measured)
            track.last_mask_logits = None  # only a trusted mask is a good prompt
            track.frames_since_update += max(slot.dt, 1)
            track.state = (
                TrackState.LOST
                if track.frames_since_update > settings.max_coast_frames
                else TrackState.COASTING
            )
            reported = predicted
        if track.state is TrackState.LOST:
            self._drop(slot.track_id)
            mask = RegionMask.empty(size)
        fsu, innovation = int(track.frames_since_update), float(track.last_innovation)
        record = TrackRecord(slot.track_id, as_box(reported), score, track.state, fsu, innovation)
        return TrackOutput(record, mask)

    def _drop(self, track_id: int) -> None:
        """Forget a track reported lost (an update can bring it back)."""
        self._lost.add(track_id)
        self._tracks.pop(track_id, None)
        self._pending.pop(track_id, None)

    # ------------------------------------------------------------------ saved state

    def snapshot(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Everything the next ``step`` depends on, as JSON-ready data and named arrays
        (later steps do not change them: copies, or read-only arrays that later steps
        replace). ``restore`` on a tracker with the same settings and decoder continues
        exactly as this one would. The queued commands are applied first, as the next
        ``step`` would (nothing comes between), so the snapshot holds them."""
        if self._apply_commands():
            self._settle()
        tracks, arrays = [], {}
        for tid, track in self._tracks.items():
            saved = {key: kind(getattr(track, key)) for key, kind in _SAVED.items()}
            tracks.append({"id": tid, "state": track.state.value, **saved})
            arrays[f"track{tid}.x"] = np.array(track.kf.x, dtype=np.float64)
            arrays[f"track{tid}.P"] = np.array(track.kf.P, dtype=np.float64)
            if track.last_mask_logits is not None:
                # As they are (float32: the next frame's mask prompt, bit for bit), and not
                # copied: they are read-only, and replaced, never changed, by later steps
                # (200 tracks' logits are 50 MB, a snapshot is taken every frame).
                arrays[f"track{tid}.logits"] = track.last_mask_logits
        for tid, prompt in self._pending.items():
            if prompt.points is not None:
                arrays[f"pending{tid}.points"] = prompt.points[0].copy()
                arrays[f"pending{tid}.labels"] = prompt.points[1].copy()
        pending = [
            {"id": tid, "frame": p.frame, "box": None if p.box is None else list(p.box)}
            for tid, p in self._pending.items()
        ]
        data: dict[str, object] = {
            "frame_size": None if self._frame_size is None else list(self._frame_size),
            "current_frame": self._current_frame,
            "next_id": self._next_id,
            "lost": sorted(self._lost),
            "tracks": tracks,
            "pending": pending,
        }
        return data, arrays

    def restore(self, data: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Replace every track, prompt and queued command with those of a ``snapshot``.

        Raises ValueError when the snapshot is malformed (nothing is changed then)."""
        try:
            tracks: dict[int, Track] = {}
            for row in data["tracks"]:
                tid = int(row["id"])
                track = tracks[tid] = Track((0.0, 0.0, 1.0, 1.0), settings=self._settings)
                track.kf.x = np.array(arrays[f"track{tid}.x"], dtype=np.float64).reshape(8, 1)
                track.kf.P = np.array(arrays[f"track{tid}.P"], dtype=np.float64).reshape(8, 8)
                track.state = TrackState(row["state"])
                for key, kind in _SAVED.items():
                    setattr(track, key, kind(row[key]))
                if f"track{tid}.logits" in arrays:
                    track.last_mask_logits = _frozen(arrays[f"track{tid}.logits"])
            pending: dict[int, Prompt] = {}
            for row in data["pending"]:
                tid = int(row["id"])
                points = None
                if f"pending{tid}.points" in arrays:
                    coords = np.array(arrays[f"pending{tid}.points"], dtype=np.float32)
                    points = (coords, np.array(arrays[f"pending{tid}.labels"], dtype=np.int32))
                pending[tid] = Prompt(
                    None if row["box"] is None else as_box(row["box"]),
                    points,
                    None if row["frame"] is None else int(row["frame"]),
                )
            size, current = data["frame_size"], data["current_frame"]
            frame_size = None if size is None else frame_size_of(size)
            current = None if current is None else int(current)
            next_id, lost = int(data["next_id"]), {int(tid) for tid in data["lost"]}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a prompt tracker snapshot: {err!r}") from None
        self._tracks, self._pending = tracks, pending
        self._frame_size, self._current_frame = frame_size, current
        self._next_id, self._lost = next_id, lost
        self.commands.take()  # they were checked against the state replaced here
        self._settle()


def _lost(
    size: tuple[int, int],
    track_id: int,
    box: Box,
    frames_since_update: int = 0,
    innovation: float = 0.0,
    score: float = 0.0,
) -> TrackOutput:
    """A LOST output: reported once, with an empty mask."""
    state = TrackState.LOST
    record = TrackRecord(track_id, as_box(box), score, state, frames_since_update, innovation)
    return TrackOutput(record, RegionMask.empty(size))


def _exclusive(
    committed: list[TrackOutput],
    masks: Sequence[RegionMask] | np.ndarray,
    contested: ContestedPixels,
) -> list[TrackOutput]:
    """Publish exclusive masks; ``committed`` holds the outputs of the decoded rows.

    Who competes for a contested pixel:
    - a LOST track takes none: it publishes an empty mask, so a pixel it won would vanish
      from every output although another track's mask covers it;
    - a COASTING track takes only pixels no trusted track claims: its mask is the one the
      tracker just judged untrustworthy, and during an occlusion it is usually a piece of
      the occluder, which must not carve the occluder's own, trusted mask;
    - trusted tracks (TRACKED / TENTATIVE this frame) compete by logit (SAM 2's rule).
    """
    priority = [_PRIORITY.get(out.record.state, 0) for out in committed]
    exclusive = exclusive_masks(masks, contested, priority)
    return [
        out if out.record.state is TrackState.LOST else TrackOutput(out.record, mask)
        for out, mask in zip(committed, exclusive, strict=True)
    ]


def _frozen(logits: np.ndarray) -> np.ndarray:
    """A read-only float32 copy: a track's mask prompt, which snapshots share, not copy."""
    frozen = np.array(logits, dtype=np.float32, copy=True)
    frozen.setflags(write=False)
    return frozen


def _points_box(prompt: Prompt) -> Box:
    """Box around a prompt's foreground points, reported when it could not start."""
    if prompt.points is None:  # only called for points prompts
        raise RuntimeError("prompt tracker invariant broken: a points prompt has no points")
    coords, labels = prompt.points
    fg = coords[labels == 1]
    return as_box((*fg.min(axis=0), *(fg.max(axis=0) + 1)))
