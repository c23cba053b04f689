"""Prompt tracker: one Kalman-filtered box per object, masks from an injected SAM decoder.

Pure logic, no sockets and no torch: the tracker node feeds it frames and control commands,
and the mask decoder (MobileSAM's prompt encoder + mask decoder on one frame's embedding) is
passed in as a callable, so tests can script it.

Per frame (``PromptTracker.step``):

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
(what the decoder answers, exclusive masks), ``prompts`` (prompt checks).
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import RunConfig, TrackerConfig, validate_config
from pipeline.track.exclusive import (
    ContestedPixels,
    DecodedMasks,
    MaskDecoderFn,
    checked_decoded,
    exclusive_masks,
)
from pipeline.track.kalman import Box, Track, as_box, box_iou, clip_box, overlaps_frame
from pipeline.track.measure import measure_box
from pipeline.track.prompts import check_box, check_points
from pipeline.wire.masks import RegionMask, is_int
from pipeline.wire.messages import MAX_TRACK_ID, TrackRecord, TrackState

if TYPE_CHECKING:  # the tracker runs any decoder; only SAM's needs torch
    from pipeline.predictor import ImageEmbedding

MAX_TRACKS_AT_ONCE = 4096
"""Tracks and pending prompts a tracker holds at one time; an add past it is refused. A
frame's masks message describes every track in its header (about 200 bytes each), and a
header is at most ``messages.MAX_HEADER_BYTES`` (1 MiB, some 5000 tracks): past that the
next node would reject the frame's masks."""

BETWEEN_INTERVAL_S = 0.01
"""When ``step`` is given ``between``, it is called about this often while the decoder works
on the frame (in a worker thread): a control command waits for this, not for a frame of
hundreds of tracks (seconds on a CPU)."""


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


# --------------------------------------------------------------------------- the tracker


@dataclass
class _Prompt:
    """A validated prompt waiting for its start frame."""

    box: Box | None  # as given; clipped at activation
    points: np.ndarray | None  # (K, 2) float32
    labels: np.ndarray | None  # (K,) int32
    frame: int | None  # None: the next step


@dataclass
class _Slot:
    """One row of this frame's decoder batch."""

    track_id: int
    track: Track | None  # None: a prompt becoming a track this frame
    prompt: _Prompt | None
    box: Box | None  # prompt box (clipped); None for points-only
    first: bool  # no prediction to agree with: trust by score only
    dt: int


class PromptTracker:
    """Follows prompted objects from frame to frame.

    Commands (``add``, ``update_box``, ``remove``) validate everything before changing
    anything: a bad one raises ValueError naming the problem and leaves every track as it
    was. ``step`` changes nothing when the decoder raises or returns malformed output, so a
    caller may retry the frame.
    """

    def __init__(
        self,
        decode: MaskDecoderFn,
        *,
        frame_size: tuple[int, int] | None = None,
        settings: TrackerConfig | None = None,
        between_interval_s: float = BETWEEN_INTERVAL_S,
    ) -> None:
        """``frame_size`` is (H, W); None when known only at the first frame (then call
        ``set_frame_size`` before the first ``step`` that activates a prompt).
        ``between_interval_s``: how often ``step``'s ``between`` runs while the decoder works."""
        if settings is not None and not isinstance(settings, TrackerConfig):
            raise TypeError(f"settings must be a TrackerConfig, got {type(settings).__name__}")
        # The gates and noise figures checked as a config file's are (a bad value names
        # its key, e.g. tracker.min_score).
        self._settings = validate_config(RunConfig(tracker=settings or TrackerConfig())).tracker
        self._decode = decode
        self._frame_size = None if frame_size is None else _check_frame_size(frame_size)
        self._tracks: dict[int, Track] = {}
        self._pending: dict[int, _Prompt] = {}
        self._restarted: set[int] = set()  # corrected by update_box: next frame is a first frame
        self._lost: set[int] = set()  # reported lost and dropped: update_box brings one back
        self._last_frame: dict[int, int] = {}  # per track, for the prediction's time step
        self._current_frame: int | None = None
        self._next_id = 1
        if (
            not (is_int(between_interval_s) or isinstance(between_interval_s, (float, np.floating)))
            or not between_interval_s > 0
        ):
            raise ValueError(
                f"between_interval_s must be a positive number, got {between_interval_s!r}"
            )
        self._between_interval_s = float(between_interval_s)
        # While a step runs with ``between``, commands may come in the middle of it; the ids
        # they touched are left as the commands made them (see ``step``).
        self._stepping = False
        self._touched: set[int] = set()

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
        """Active tracks by id (read-only view; pending prompts are not tracks yet)."""
        return MappingProxyType(self._tracks)

    def set_frame_size(self, frame_size: tuple[int, int]) -> None:
        """Set (H, W), at the first frame or when the source changes resolution mid-stream.

        A change rescales every track (its Kalman state and covariance, ``Track.rescale``)
        and every pending prompt's box and points to the new size, as the same scene seen at
        the new resolution: the next ``step`` predicts, prompts and measures in new pixels.
        """
        self._not_stepping("set_frame_size")
        new = _check_frame_size(frame_size)
        old, self._frame_size = self._frame_size, new
        if old is None or old == new:
            return
        sx, sy = new[1] / old[1], new[0] / old[0]
        for track in self._tracks.values():
            track.rescale(sx, sy)
        for prompt in self._pending.values():
            if prompt.box is not None:
                x1, y1, x2, y2 = prompt.box
                prompt.box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
            if prompt.points is not None:
                prompt.points = (prompt.points * np.array([sx, sy])).astype(np.float32)

    # ------------------------------------------------------------------ commands

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
        points/labels: (K, 2) x/y pixels and K labels (1 foreground, 0 background), used with
            the box on the first frame only (the object moves away from them afterwards). A
            points-only prompt starts the filter from its first mask's box.
        track_id: a specific id (1..MAX_TRACK_ID) not in use; default: the next never-used
            id (past MAX_TRACK_ID: ValueError "track id limit reached", nothing changed).
        frame: first frame index to apply it at; default the next ``step``.
        """
        if box is None and points is None:
            raise ValueError("prompt needs a box or points, got neither")
        checked_box = None if box is None else check_box(box, "box", self._frame_size)
        checked_points, checked_labels = (None, None)
        if points is not None or labels is not None:
            checked_points, checked_labels = check_points(
                points, labels, "points", self._frame_size
            )
            if checked_box is None and not np.any(checked_labels == 1):
                raise ValueError("points-only prompt needs at least one foreground point (label 1)")
        if frame is not None and (not is_int(frame) or frame < 0):
            raise ValueError(f"frame must be a frame index >= 0, got {frame!r}")
        self._check_room()
        if track_id is None:
            if self._next_id > MAX_TRACK_ID:
                raise ValueError(
                    f"track id limit reached: ids 1..{MAX_TRACK_ID} are used up (ids are never "
                    "reused; an add with an explicit free track_id still works)"
                )
            new_id = self._next_id
        else:
            if not is_int(track_id) or not 1 <= track_id <= MAX_TRACK_ID:
                raise ValueError(
                    f"track_id must be an integer in 1..{MAX_TRACK_ID}, got {track_id!r}"
                )
            if track_id in self._tracks or track_id in self._pending:
                raise ValueError(f"track_id {track_id} is already in use")
            new_id = int(track_id)
        self._pending[new_id] = _Prompt(
            checked_box, checked_points, checked_labels, None if frame is None else int(frame)
        )
        self._next_id = max(self._next_id, new_id + 1)
        self._lost.discard(new_id)
        self._touch(new_id)
        return new_id

    def update_box(self, track_id: int, box: Sequence[float] | np.ndarray) -> None:
        """Correct an object's box: the filter restarts there (same id, hits and state).
        A track that was lost comes back under its id, as a new prompt at that box."""
        if is_int(track_id) and track_id in self._lost:
            checked = check_box(box, "box", self._frame_size)
            self._check_room()
            self._lost.discard(track_id)
            self._pending[int(track_id)] = _Prompt(checked, None, None, None)
            self._touch(track_id)
            return
        self._check_known(track_id)
        checked = check_box(box, "box", self._frame_size)
        self._touch(track_id)
        if track_id in self._pending:
            self._pending[track_id].box = checked
            return
        track = self._tracks[track_id]
        track.reset(checked)
        self._restarted.add(track_id)

    def remove(self, track_id: int) -> None:
        """Forget a track or pending prompt; it is not reported again."""
        if not (is_int(track_id) and track_id in self._lost):
            self._check_known(track_id)
        self._touch(track_id)
        self._drop(track_id)
        self._lost.discard(track_id)  # removed, not lost: update_box does not bring it back

    def lose_all(self) -> builtins.list[TrackOutput]:
        """Mark every running track lost, e.g. after the camera was gone so long that the
        filters' predictions mean nothing; returns their last outputs (state "lost", empty
        masks). Pending prompts stay pending."""
        self._not_stepping("lose_all")
        if self._frame_size is None:
            return []
        outputs = [
            self._lost_output(
                tid,
                track.predicted_box,
                track.last_innovation,
                track.frames_since_update,
                track.last_score,
            )
            for tid, track in sorted(self._tracks.items())
        ]
        for output in outputs:
            self._drop(output.record.track_id)
        return outputs

    # ------------------------------------------------------------------ the frame

    def step(
        self,
        frame_index: int,
        image: ImageEmbedding | None = None,
        *,
        between: Callable[[], object] | None = None,
    ) -> list[TrackOutput]:
        """Track every object into frame ``frame_index``; outputs sorted by track id.

        Frame indices must increase; gaps (frames dropped in live mode) are predicted over.

        image: the frame's embedding, handed to the decoder as it is (a scripted decoder in
            tests may need none).

        between: called again and again while the frame is worked on (every
            ``between_interval_s`` while the decoder runs, in a worker thread then, and after
            each track's update), so that a caller can serve commands in the middle of a
            frame of many tracks instead of after it. Commands (``add``, ``update_box``,
            ``remove``) may then be called from it. A track a command touches while its frame
            is worked on is left as the command made it and is not in this frame's outputs:
            a removed track is gone, a corrected one starts from its new box at the next
            frame, an added prompt waits for the next frame; it takes no pixels from the
            others' exclusive masks. The decoder call is the same either way (one batch of
            every track, on arrays built before it starts), so are the masks.
        """
        if not is_int(frame_index) or frame_index < 0:
            raise ValueError(f"frame_index must be an integer >= 0, got {frame_index!r}")
        if self._current_frame is not None and frame_index <= self._current_frame:
            raise ValueError(
                f"frame_index must increase: got {frame_index} after {self._current_frame}"
            )
        self._not_stepping("step")
        self._stepping, self._touched = True, set()
        try:
            return self._step(frame_index, image, between)
        finally:
            self._stepping, self._touched = False, set()

    def _step(
        self,
        frame_index: int,
        image: ImageEmbedding | None,
        between: Callable[[], object] | None,
    ) -> list[TrackOutput]:
        due = {
            tid: p for tid, p in self._pending.items() if p.frame is None or p.frame <= frame_index
        }
        if (due or self._tracks) and self._frame_size is None:
            raise RuntimeError("frame size is unknown: call set_frame_size((H, W)) before step()")
        size = self._frame_size

        # Phase 1: build the batch without touching any track, so a failing decoder leaves
        # the tracker as it was.
        slots: list[_Slot] = []
        rejected: list[TrackOutput] = []  # leave the frame / prompt outside the frame
        for tid, track in self._tracks.items():
            dt = frame_index - self._last_frame[tid]
            if tid in self._restarted:
                slots.append(_Slot(tid, track, None, clip_box(track.predicted_box, size), True, dt))
                continue
            predicted = track.peek(dt)
            if not overlaps_frame(predicted, size):
                rejected.append(
                    self._lost_output(
                        tid, predicted, track.last_innovation, track.frames_since_update + dt
                    )
                )
                continue
            slots.append(_Slot(tid, track, None, clip_box(predicted, size), False, dt))
        for tid, prompt in due.items():
            # The frame check was deferred when the prompt came before the frame size.
            box_ok = prompt.box is None or overlaps_frame(prompt.box, size)
            points_ok = prompt.points is None or _points_inside(prompt.points, size)
            if not (box_ok and points_ok):
                shown = prompt.box if prompt.box is not None else _points_box(prompt)
                rejected.append(self._lost_output(tid, shown, 0.0, 0))
                continue
            box = None if prompt.box is None else clip_box(prompt.box, size)
            slots.append(_Slot(tid, None, prompt, box, True, 0))

        decoded = self._decode_batch(slots, image, between) if slots else None

        # Phase 2: commit. Ids a command touched meanwhile (``self._touched``, filled by
        # commands that ``between`` served) stay as the command left them.
        touched = self._touched
        self._current_frame = frame_index
        for out in rejected:
            if out.record.track_id not in touched:
                self._drop(out.record.track_id)
        committed: list[tuple[int, TrackOutput]] = []  # (decoded row, output)
        for row, slot in enumerate(slots):
            if decoded is None:  # cannot happen: slots is non-empty here
                raise RuntimeError("prompt tracker invariant broken: decoded is None")
            if slot.track_id in touched:
                continue
            committed.append((row, self._commit(slot, decoded, row, frame_index)))
            if between is not None:
                between()
        # Phase 3: exclusive masks, once every track's state is known. The measurements
        # above used each track's own mask (see _commit), so this changes only what is
        # published.
        if decoded is not None and decoded.contested is not None:
            committed = self._exclusive(committed, decoded, touched)
        outputs = [
            out
            for out in (*rejected, *(out for _, out in committed))
            if out.record.track_id not in touched
        ]
        outputs.sort(key=lambda out: out.record.track_id)
        return outputs

    @staticmethod
    def _exclusive(
        committed: list[tuple[int, TrackOutput]], decoded: DecodedMasks, touched: set[int]
    ) -> list[tuple[int, TrackOutput]]:
        """Publish exclusive masks; ``committed`` holds (decoded row, output) pairs.

        Who competes for a contested pixel:
        - a LOST track takes none: it publishes an empty mask, so a pixel it won would vanish
          from every output although another track's mask covers it; nor does a track a
          command touched during the frame (it is not published this frame);
        - a COASTING track takes only pixels no trusted track claims: its mask is the one the
          tracker just judged untrustworthy, and during an occlusion it is usually a piece of
          the occluder, which must not carve the occluder's own, trusted mask;
        - trusted tracks (TRACKED / TENTATIVE this frame) compete by logit (SAM 2's rule).
        """
        contested = decoded.contested
        if contested is None:  # cannot happen: checked by step()
            raise RuntimeError("prompt tracker invariant broken: no contested pixels")
        rows = [row for row, _ in committed]
        if len(rows) != len(decoded.masks):  # some rows were touched: only the others compete
            if contested.windows is not None:
                contested = ContestedPixels(windows=[contested.windows[row] for row in rows])
            elif contested.logits is not None:
                contested = ContestedPixels(index=contested.index, logits=contested.logits[rows])
        priority = [
            -1
            if out.record.state is TrackState.LOST or out.record.track_id in touched
            else 1
            if out.record.state is TrackState.COASTING
            else 0
            for _, out in committed
        ]
        masks = exclusive_masks([decoded.masks[row] for row in rows], contested, priority)
        return [
            (row, out if out.record.state is TrackState.LOST else TrackOutput(out.record, mask))
            for (row, out), mask in zip(committed, masks, strict=True)
        ]

    def _decode_batch(
        self,
        slots: list[_Slot],
        image: ImageEmbedding | None,
        between: Callable[[], object] | None = None,
    ) -> DecodedMasks:
        """The decoder's answer for every slot, in one call (with ``between``, run in a worker
        thread while this one calls ``between``)."""
        boxes = np.array(
            [s.box if s.box is not None else (np.nan,) * 4 for s in slots], dtype=np.float32
        ).reshape(len(slots), 4)
        logits: list[np.ndarray | None] = [
            s.track.last_mask_logits
            if s.track is not None and not s.first and self._settings.use_mask_prompt
            else None
            for s in slots
        ]
        points: list[tuple[np.ndarray, np.ndarray] | None] | None = None
        if any(s.prompt is not None and s.prompt.points is not None for s in slots):
            points = [
                (s.prompt.points, s.prompt.labels)
                if s.prompt is not None
                and s.prompt.points is not None
                and s.prompt.labels is not None
                else None
                for s in slots
            ]
        if between is None:
            decoded = self._decode(image, boxes, logits, points=points)
        else:
            decoded = self._decode_meanwhile(image, boxes, logits, points, between)
        return checked_decoded(decoded, len(slots), self._frame_size)

    def _decode_meanwhile(
        self,
        image: ImageEmbedding | None,
        boxes: np.ndarray,
        logits: list[np.ndarray | None],
        points: list[tuple[np.ndarray, np.ndarray] | None] | None,
        between: Callable[[], object],
    ) -> DecodedMasks:
        """The decoder call in a worker thread, ``between`` in this one every
        ``between_interval_s`` until it returns; its exception, if any, is raised here.

        The decoder (torch or ONNX Runtime) computes without the GIL, so the commands
        ``between`` serves meanwhile cost it little. It reads only the arrays built for it,
        which no command changes (a correction rebinds a track's logits, it does not write
        into them), so what it decodes is what it would have decoded alone. A batch in one
        call rather than slices keeps its throughput: a call has a fixed cost, several
        milliseconds on a CPU, that slices would pay again and again."""
        outcome: list[tuple[DecodedMasks | None, BaseException | None]] = []

        def work() -> None:
            try:
                outcome.append((self._decode(image, boxes, logits, points=points), None))
            except BaseException as err:  # handed to the caller's thread, raised there
                outcome.append((None, err))

        worker = threading.Thread(target=work, name="samstream-decode", daemon=True)
        worker.start()
        while True:  # once at least, however fast the decoder
            worker.join(self._between_interval_s)
            between()
            if not worker.is_alive():
                break
        decoded, error = outcome[0]
        if error is not None:
            raise error
        if decoded is None:  # cannot happen: work() hands over one or the other
            raise RuntimeError("prompt tracker invariant broken: the decoder returned nothing")
        return decoded

    def _commit(
        self, slot: _Slot, decoded: DecodedMasks, row: int, frame_index: int
    ) -> TrackOutput:
        mask: RegionMask = decoded.masks[row]
        score, logits = float(decoded.scores[row]), decoded.low_res_logits[row]
        settings, size = self._settings, self._frame_size
        if size is None:  # cannot happen: checked by step()
            raise RuntimeError("prompt tracker invariant broken: size is None")
        # The measurement is taken on the track's own mask, not on its exclusive share: a box
        # cut down by a neighbour's mask shrinks the filter's size, the next prompt with it,
        # and the next mask (a feedback loop that outlasts the overlap), and it would make a
        # track's filter depend on which other tracks exist. SAM 2 likewise keeps overlapping
        # masks for its memory and applies the non-overlap rule to its output only. Only the
        # components that agree with the box prompt count (the prediction; on a first frame
        # the prompt box, or the foreground points): a stray fragment does not move the box.
        if slot.box is not None:
            reference: Box | None = slot.box
        elif slot.prompt is not None and slot.prompt.points is not None:
            reference = _points_box(slot.prompt)
        else:
            reference = None
        measured = measure_box(mask, reference)
        track = slot.track
        if track is None:
            start = slot.box if slot.box is not None else measured
            if start is None:  # points-only prompt and nothing segmented: nothing to follow
                if slot.prompt is None:  # cannot happen: invariant
                    raise RuntimeError("prompt tracker invariant broken: slot.prompt is None")
                self._pending.pop(slot.track_id, None)
                return self._lost_output(slot.track_id, _points_box(slot.prompt), 0.0, 1, score)
            track = Track(slot.track_id, start, settings=settings)
            self._tracks[slot.track_id] = track
            self._pending.pop(slot.track_id, None)
        elif not slot.first:
            track.predict(slot.dt)
        self._restarted.discard(slot.track_id)
        self._last_frame[slot.track_id] = frame_index
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
        record = TrackRecord(
            track_id=slot.track_id,
            box=as_box(reported),
            score=score,
            state=track.state,
            frames_since_update=int(track.frames_since_update),
            innovation=float(track.last_innovation),
        )
        return TrackOutput(record, mask)

    def _lost_output(
        self,
        track_id: int,
        box: Box,
        innovation: float,
        frames_since_update: int,
        score: float = 0.0,
    ) -> TrackOutput:
        if self._frame_size is None:  # cannot happen: checked by step()
            raise RuntimeError("prompt tracker invariant broken: self._frame_size is None")
        record = TrackRecord(
            track_id=track_id,
            box=as_box(box),
            score=float(score),
            state=TrackState.LOST,
            frames_since_update=frames_since_update,
            innovation=float(innovation),
        )
        return TrackOutput(record, RegionMask.empty(self._frame_size))

    def _drop(self, track_id: int) -> None:
        """Forget a track reported lost (``update_box`` can bring it back)."""
        self._lost.add(track_id)
        self._tracks.pop(track_id, None)
        self._pending.pop(track_id, None)
        self._restarted.discard(track_id)
        self._last_frame.pop(track_id, None)

    def _check_room(self) -> None:
        held = len(self._tracks) + len(self._pending)
        if held >= MAX_TRACKS_AT_ONCE:
            raise ValueError(
                f"too many tracks at once: {held} tracks and prompts, at most "
                f"{MAX_TRACKS_AT_ONCE} (one frame's masks message holds no more); remove some"
            )

    def _touch(self, track_id: int) -> None:
        """A command changed this id: if a step is under way, it leaves the id alone."""
        if self._stepping:
            self._touched.add(int(track_id))

    def _not_stepping(self, what: str) -> None:
        if self._stepping:
            raise RuntimeError(f"{what}() cannot run in the middle of step()")

    def _check_known(self, track_id: int) -> None:
        known = is_int(track_id) and (track_id in self._tracks or track_id in self._pending)
        if not known:
            raise ValueError(f"unknown track id {track_id!r}")

    # ------------------------------------------------------------------ saved state

    def snapshot(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Everything the next ``step`` depends on, as JSON-ready data and named arrays
        (later steps do not change them: copies, or read-only arrays that later steps
        replace). ``restore`` on a tracker with the same settings and decoder continues
        exactly as this one would."""
        tracks = []
        arrays: dict[str, np.ndarray] = {}
        for tid, track in self._tracks.items():
            tracks.append(
                {
                    "id": tid,
                    "state": track.state.value,
                    "hits": track.hits,
                    "frames_since_update": track.frames_since_update,
                    "last_score": float(track.last_score),
                    "last_innovation": float(track.last_innovation),
                    "last_frame": self._last_frame.get(tid),
                    "restarted": tid in self._restarted,
                    "has_logits": track.last_mask_logits is not None,
                }
            )
            arrays[f"track{tid}.x"] = np.array(track.kf.x, dtype=np.float64)
            arrays[f"track{tid}.P"] = np.array(track.kf.P, dtype=np.float64)
            if track.last_mask_logits is not None:
                # As they are (float32: the next frame's mask prompt, bit for bit), and not
                # copied: they are read-only, and replaced, never changed, by later steps
                # (200 tracks' logits are 50 MB, a snapshot is taken every frame).
                arrays[f"track{tid}.logits"] = track.last_mask_logits
        pending = []
        for tid, prompt in self._pending.items():
            pending.append(
                {
                    "id": tid,
                    "frame": prompt.frame,
                    "box": None if prompt.box is None else [float(v) for v in prompt.box],
                }
            )
            if prompt.points is not None and prompt.labels is not None:
                arrays[f"pending{tid}.points"] = prompt.points.copy()
                arrays[f"pending{tid}.labels"] = prompt.labels.copy()
        data: dict[str, object] = {
            "frame_size": None if self._frame_size is None else list(self._frame_size),
            "current_frame": self._current_frame,
            "next_id": self._next_id,
            "lost": sorted(self._lost),
            "tracks": tracks,
            "pending": pending,
        }
        return data, arrays

    def restore(self, data: Mapping[str, object], arrays: Mapping[str, np.ndarray]) -> None:
        """Replace every track and prompt with those of a ``snapshot``.

        Raises ValueError when the snapshot is malformed (nothing is changed then)."""
        self._not_stepping("restore")
        try:
            tracks: dict[int, Track] = {}
            last_frame: dict[int, int] = {}
            restarted: set[int] = set()
            for row in data["tracks"]:  # type: ignore[attr-defined]
                tid = int(row["id"])
                track = Track(tid, (0.0, 0.0, 1.0, 1.0), settings=self._settings)
                track.kf.x = np.array(arrays[f"track{tid}.x"], dtype=np.float64).reshape(8, 1)
                track.kf.P = np.array(arrays[f"track{tid}.P"], dtype=np.float64).reshape(8, 8)
                track.state = TrackState(row["state"])
                track.hits = int(row["hits"])
                track.frames_since_update = int(row["frames_since_update"])
                track.last_score = float(row["last_score"])
                track.last_innovation = float(row["last_innovation"])
                if row["has_logits"]:
                    track.last_mask_logits = _frozen(arrays[f"track{tid}.logits"])
                if row["last_frame"] is not None:
                    last_frame[tid] = int(row["last_frame"])
                if row["restarted"]:
                    restarted.add(tid)
                tracks[tid] = track
            pending: dict[int, _Prompt] = {}
            for row in data["pending"]:  # type: ignore[attr-defined]
                tid = int(row["id"])
                points = arrays.get(f"pending{tid}.points")
                labels = arrays.get(f"pending{tid}.labels")
                pending[tid] = _Prompt(
                    None if row["box"] is None else as_box(row["box"]),
                    None if points is None else np.array(points, dtype=np.float32),
                    None if labels is None else np.array(labels, dtype=np.int32),
                    None if row["frame"] is None else int(row["frame"]),
                )
            size = data["frame_size"]
            frame_size = None if size is None else _check_frame_size(tuple(size))  # type: ignore[arg-type]
            current = data["current_frame"]
            next_id = int(data["next_id"])  # type: ignore[call-overload]
            lost = {int(tid) for tid in data["lost"]}  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a prompt tracker snapshot: {err!r}") from None
        self._tracks, self._pending = tracks, pending
        self._last_frame, self._restarted = last_frame, restarted
        self._frame_size = frame_size
        self._current_frame = None if current is None else int(current)  # type: ignore[call-overload]
        self._next_id = next_id
        self._lost = lost

    def list(self) -> builtins.list[dict[str, object]]:
        """Tracks and pending prompts as plain data (JSON-ready), sorted by id.

        Keys: id, state, box (None for a pending points-only prompt), score,
        frames_since_update, pending (True until the start frame), start_frame.
        """
        rows: builtins.list[dict[str, object]] = []
        for tid, track in self._tracks.items():
            rows.append(
                {
                    "id": tid,
                    "state": track.state.value,
                    "box": [float(v) for v in track.predicted_box],
                    "score": track.last_score,
                    "frames_since_update": track.frames_since_update,
                    "pending": False,
                    "start_frame": None,
                }
            )
        for tid, prompt in self._pending.items():
            rows.append(
                {
                    "id": tid,
                    "state": TrackState.TENTATIVE.value,
                    "box": None if prompt.box is None else [float(v) for v in prompt.box],
                    "score": 0.0,
                    "frames_since_update": 0,
                    "pending": True,
                    "start_frame": prompt.frame,
                }
            )
        return sorted(rows, key=lambda row: row["id"])  # type: ignore[arg-type, return-value]


def _frozen(logits: np.ndarray) -> np.ndarray:
    """A read-only float32 copy: a track's mask prompt, which snapshots share, not copy."""
    frozen = np.array(logits, dtype=np.float32, copy=True)
    frozen.setflags(write=False)
    return frozen


# --------------------------------------------------------------------------- validation


def _check_frame_size(frame_size: object) -> tuple[int, int]:
    if (
        not isinstance(frame_size, (tuple, builtins.list))
        or len(frame_size) != 2
        or not all(is_int(v) and v > 0 for v in frame_size)
    ):
        raise ValueError(f"frame_size must be (H, W) positive integers, got {frame_size!r}")
    return (int(frame_size[0]), int(frame_size[1]))


def _points_inside(points: np.ndarray, frame_size: tuple[int, int]) -> bool:
    """`prompts.check_points`' frame check, for prompts that came before the frame size."""
    try:
        check_points(points, None, frame_size=frame_size)
    except ValueError:
        return False
    return True


def _points_box(prompt: _Prompt) -> Box:
    """Box around a prompt's foreground points, reported when it could not start."""
    if prompt.points is None or prompt.labels is None:  # only called for points prompts
        raise RuntimeError("prompt tracker invariant broken: a points prompt has no points")
    fg = prompt.points[prompt.labels == 1]
    return as_box((*fg.min(axis=0), *(fg.max(axis=0) + 1)))
