"""Prompt tracker logic with a scripted stand-in for MobileSAM's mask decoder (no torch)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from support.masks import mask_box

from nodes import tracker as tracker_node
from nodes.tracker import TrackerNode
from pipeline.config import PromptConfig, TrackerConfig
from pipeline.model.transforms import resized_shape
from pipeline.run import resume
from pipeline.track.commands import MAX_TRACKS_AT_ONCE
from pipeline.track.exclusive import ContestedPixels, DecodedMasks, exclusive_masks
from pipeline.track.kalman import box_iou, box_to_state, state_to_box
from pipeline.track.measure import measure_box
from pipeline.track.tracking import PromptTracker, TrackOutput
from pipeline.wire.messages import (
    MAX_TRACK_ID,
    EmbeddingMessage,
    FrameMeta,
    MaskMessage,
    PromptCommand,
    TrackState,
)

pytestmark = pytest.mark.timeout(60)

SIZE = (240, 320)  # H, W
VELOCITY = (3, 2)  # pixels per frame


def moving_box(frame: int, start=(20, 30, 60, 90), velocity=VELOCITY) -> tuple[int, ...]:
    vx, vy = velocity
    x1, y1, x2, y2 = start
    return (x1 + vx * frame, y1 + vy * frame, x2 + vx * frame, y2 + vy * frame)


@dataclass
class Call:
    boxes: np.ndarray
    mask_logits: list
    points: list | None


class SceneDecoder:
    """Segments the scene rectangle a prompt covers best, with the score set for it.

    ``objects`` maps a name to ``(box, score)`` and is rewritten by the test each frame. A box
    prompt selects the object with the highest IoU (none overlapping: empty mask, score 0); a
    points-only prompt (NaN box row) selects the object under its first foreground point.
    Low-res logits are filled with ``100 * call number + row`` so tests can tell which mask
    prompt came back. Every non-empty mask also gets the ``fragments`` rectangles (stray
    blobs elsewhere in the frame, as SAM sometimes adds).
    """

    def __init__(self, size=SIZE):
        self.size = size
        self.objects: dict[str, tuple[tuple[int, ...], float]] = {}
        self.fragments: list[tuple[int, int, int, int]] = []
        self.calls: list[Call] = []
        self.fault: str | None = None  # "raise" or "malformed", to test failure handling
        self.during = None  # called as the decoder starts: a command in the middle of a frame

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        if self.during is not None:
            self.during()
        if self.fault == "raise":
            raise RuntimeError("CUDA out of memory")
        self.calls.append(Call(boxes.copy(), list(mask_logits), points))
        n = len(boxes)
        masks = np.zeros((n, *self.size), dtype=bool)
        scores = np.zeros(n)
        logits = np.zeros((n, 16, 16), dtype=np.float32)
        for row, box in enumerate(boxes):
            target = self._pick(box, None if points is None else points[row])
            if target is not None:
                (x1, y1, x2, y2), scores[row] = target
                masks[row, max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
                for fx1, fy1, fx2, fy2 in self.fragments:
                    masks[row, fy1:fy2, fx1:fx2] = True
            logits[row] = 100 * len(self.calls) + row
        if self.fault == "malformed":
            masks = masks[:, :10]
        return DecodedMasks(masks=masks, scores=scores, low_res_logits=logits)

    def _pick(self, box, points):
        if np.all(np.isnan(box)):
            coords, labels = points
            x, y = coords[labels == 1][0]
            for obj, score in self.objects.values():
                if obj[0] <= x < obj[2] and obj[1] <= y < obj[3]:
                    return obj, score
            return None
        best = max(self.objects.values(), key=lambda o: box_iou(box, o[0]), default=None)
        return best if best is not None and box_iou(box, best[0]) > 0 else None


def make(settings: TrackerConfig | None = None) -> tuple[PromptTracker, SceneDecoder]:
    decoder = SceneDecoder()
    return PromptTracker(decoder, frame_size=SIZE, settings=settings), decoder


def by_id(outputs: list[TrackOutput]) -> dict[int, TrackOutput]:
    return {out.record.track_id: out for out in outputs}


def close(a, b, tol: float) -> bool:
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- helpers, settings


def test_box_helpers():
    box = (10.0, 20.0, 50.0, 80.0)
    assert np.allclose(box_to_state(box), [30, 50, 40, 60])
    assert state_to_box(box_to_state(box)) == box
    assert box_iou(box, box) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    mask = np.zeros((20, 20), dtype=bool)
    assert mask_box(mask) is None
    mask[4:9, 3:8] = True
    assert mask_box(mask) == (3.0, 4.0, 8.0, 9.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_score", 1.5),
        ("min_agreement", -0.1),
        ("max_coast_frames", -1),
        ("max_coast_frames", 2.5),
        ("confirm_frames", 0),
        ("use_mask_prompt", 1),
        ("process_noise", 0.0),
        ("measurement_noise", math.nan),
    ],
)
def test_settings_reject_bad_values(field, value):
    # Checked as a config file is: the error names the key.
    with pytest.raises(ValueError, match=f"tracker.{field}"):
        PromptTracker(SceneDecoder(), frame_size=SIZE, settings=TrackerConfig(**{field: value}))


# --------------------------------------------------------------------------- following


def test_follows_constant_velocity_and_learns_it():
    tracker, decoder = make()
    tid = tracker.commands.add(box=(18, 27, 63, 92))  # a rough user box around the object
    assert tid == 1
    for frame in range(30):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        (out,) = tracker.step(frame)
        assert out.record.track_id == tid
        assert out.record.state is (TrackState.TENTATIVE if frame == 0 else TrackState.TRACKED)
        assert close(out.record.box, moving_box(frame), 1.0)
        assert out.mask.frame_size == SIZE and out.mask.any()
        assert math.isfinite(out.record.innovation)
        if frame >= 3:  # the prompt is the prediction: it already moves with the object
            assert close(decoder.calls[-1].boxes[0], moving_box(frame), 2.0)
    velocity = tracker.tracks[tid].kf.x[4:8, 0]
    assert np.allclose(velocity, [*VELOCITY, 0, 0], atol=0.1)
    assert tracker.commands.listing() == [
        {
            "track_id": tid,
            "state": "tracked",
            "box": pytest.approx(list(moving_box(29)), abs=1.0),
            "score": 0.9,
            "frames_since_update": 0,
            "pending": False,
            "start_frame": None,
        }
    ]


def test_occlusion_coasts_on_learnt_velocity_and_recovers():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    occluded = range(10, 15)
    for frame in range(25):
        decoder.objects = {"a": (moving_box(frame), 0.1 if frame in occluded else 0.9)}
        out = by_id(tracker.step(frame))[tid]
        if frame in occluded:
            assert out.record.state is TrackState.COASTING
            assert out.record.frames_since_update == frame - occluded.start + 1
            assert out.mask.any()  # coasting still publishes the decoder's mask
            assert close(out.record.box, moving_box(frame), 2.0)  # the prediction keeps moving
        elif frame >= 1:
            assert out.record.state is TrackState.TRACKED and out.record.frames_since_update == 0
            assert close(out.record.box, moving_box(frame), 1.0)


def test_lost_after_max_coast_frames_then_dropped():
    tracker, decoder = make(TrackerConfig(max_coast_frames=3))
    tid = tracker.commands.add(box=moving_box(0))
    for frame in range(5):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    decoder.objects = {}  # the object vanishes: empty masks
    states = [by_id(tracker.step(frame))[tid] for frame in range(5, 9)]
    assert [o.record.state for o in states] == [TrackState.COASTING] * 3 + [TrackState.LOST]
    assert [o.record.frames_since_update for o in states] == [1, 2, 3, 4]
    assert not states[-1].mask.any()
    calls = len(decoder.calls)
    assert tracker.step(9) == []
    assert len(decoder.calls) == calls  # no tracks: no decode
    assert tracker.commands.listing() == []


def test_track_leaving_the_frame_is_lost():
    tracker, decoder = make()
    tid = tracker.commands.add(box=(200, 100, 240, 140))
    for frame in range(20):
        box = moving_box(frame, start=(200, 100, 240, 140), velocity=(12, 0))
        decoder.objects = {"a": (box, 0.9)}
        out = by_id(tracker.step(frame)).get(tid)
        if out is None or out.record.state is TrackState.LOST:
            break
    assert out is not None and out.record.state is TrackState.LOST
    assert out.record.box[0] >= SIZE[1]  # its prediction has left the frame
    assert out.record.frames_since_update < tracker.settings.max_coast_frames
    assert tid not in tracker.tracks


def test_two_objects_batched_in_one_decode_per_step():
    tracker, decoder = make()
    start_b, velocity_b = (250, 150, 290, 200), (-2, -1)
    a = tracker.commands.add(box=moving_box(0))
    b = tracker.commands.add(box=start_b)
    for frame in range(15):
        decoder.objects = {
            "a": (moving_box(frame), 0.9),
            "b": (moving_box(frame, start_b, velocity_b), 0.8),
        }
        outputs = tracker.step(frame)
        assert len(decoder.calls) == frame + 1  # exactly one call per step
        assert decoder.calls[-1].boxes.shape == (2, 4)
        assert decoder.calls[-1].boxes.dtype == np.float32
        assert [o.record.track_id for o in outputs] == [a, b]
        assert close(outputs[0].record.box, moving_box(frame), 1.0)
        assert close(outputs[1].record.box, moving_box(frame, start_b, velocity_b), 1.0)
    assert np.allclose(tracker.tracks[b].kf.x[4:6, 0], velocity_b, atol=0.1)


def test_dropped_frames_are_predicted_over():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    for frame in [0, 1, 2, 3, 4, 7, 10, 15, 16]:
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        out = by_id(tracker.step(frame))[tid]
        assert out.record.state is not TrackState.COASTING
        if frame >= 4:
            assert close(decoder.calls[-1].boxes[0], moving_box(frame), 2.0)


# --------------------------------------------------------------------------- measurement


def components_oracle(mask: np.ndarray, reference) -> tuple[float, ...] | None:
    """measure_box's rule on the whole frame, written out plainly."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    x1, y1, x2, y2 = (max(v, 0) for v in reference)  # a negative stop would wrap around
    inside = labels[math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)]
    kept = [k for k in np.unique(inside) if k > 0]
    if not kept:
        kept = [max(range(1, count), key=lambda k: int((labels == k).sum()))]
    return mask_box(np.isin(labels, kept))


def test_measure_box_keeps_the_components_that_meet_the_reference():
    mask = np.zeros(SIZE, dtype=bool)
    assert measure_box(mask, (10, 10, 50, 50)) is None
    mask[20:60, 30:50] = True  # the object, in two parts split by an occluder
    mask[20:60, 55:70] = True
    mask[200:230, 280:310] = True  # a far fragment
    assert mask_box(mask) == (30.0, 20.0, 310.0, 230.0)  # all pixels: blown up
    assert measure_box(mask, (28, 18, 72, 62)) == (30.0, 20.0, 70.0, 60.0)
    # No component meets the reference: the largest one.
    assert measure_box(mask, (150, 100, 170, 120)) == (280.0, 200.0, 310.0, 230.0)
    assert measure_box(mask, None) == (280.0, 200.0, 310.0, 230.0)
    # A component reaching far beyond the crop around the reference is measured whole.
    mask[:] = False
    mask[100:110, 100:110] = True
    mask[104:106, 110:300] = True
    assert measure_box(mask, (100, 100, 110, 110)) == (100.0, 100.0, 300.0, 110.0)


def test_measure_box_on_the_crop_equals_the_whole_frame():
    rng = np.random.default_rng(0)
    for _ in range(60):
        mask = np.zeros(SIZE, dtype=bool)
        for _ in range(rng.integers(1, 6)):
            x, y = rng.integers(0, 300), rng.integers(0, 220)
            w, h = rng.integers(2, 80), rng.integers(2, 60)
            mask[y : y + h, x : x + w] = True
        x, y = rng.uniform(-20, 300), rng.uniform(-20, 220)
        reference = (x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60))
        assert measure_box(mask, reference) == components_oracle(mask, reference)


def test_stray_fragments_do_not_move_the_measurement():
    """The measurement is the box of the object's component, not of every mask pixel: with
    the old all-pixels box the far fragment would make every measurement disagree with the
    prediction (the track would coast and be lost), and stretch the first frame's box."""
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    fragment = (280, 200, 300, 220)
    for frame in range(12):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        decoder.fragments = [fragment] if frame == 0 or frame >= 5 else []
        out = by_id(tracker.step(frame))[tid]
        assert out.record.state is (TrackState.TENTATIVE if frame == 0 else TrackState.TRACKED)
        assert close(out.record.box, moving_box(frame), 1.0)
        if decoder.fragments:
            fx1, fy1, fx2, fy2 = fragment
            # The published mask is the decoder's.
            assert out.mask.dense()[fy1:fy2, fx1:fx2].all()
            prompt = decoder.calls[-1].boxes[0]  # the prediction (first frame: the prompt)
            assert box_iou(mask_box(out.mask), prompt) < tracker.settings.min_agreement
    assert close(tracker.tracks[tid].predicted_box, moving_box(11), 1.0)
    assert np.allclose(tracker.tracks[tid].kf.x[4:8, 0], [*VELOCITY, 0, 0], atol=0.2)


def test_points_only_prompt_measures_the_component_under_its_point():
    tracker, decoder = make()
    tid = tracker.commands.add(points=[[40, 60]], labels=[1])
    decoder.objects = {"a": (moving_box(0), 0.9)}
    decoder.fragments = [(280, 200, 300, 220)]
    (out,) = tracker.step(0)
    assert out.record.track_id == tid and out.record.box == moving_box(0)


# --------------------------------------------------------------------------- exclusive masks


class ContestDecoder(SceneDecoder):
    """SceneDecoder that reports contested pixels, like SamMaskDecoder(exclusive=True).

    ``logits`` maps an object name to the logit of every pixel of its masks (-1 elsewhere).
    """

    def __init__(self, size=SIZE):
        super().__init__(size)
        self.logits: dict[str, float] = {}
        self._names: list[str | None] = []

    def _pick(self, box, points):
        target = super()._pick(box, points)
        names = [name for name, obj in self.objects.items() if obj == target]
        self._names.append(names[0] if target is not None else None)
        return target

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        self._names = []
        decoded = super().__call__(image, boxes, mask_logits, points)
        flat = decoded.masks.reshape(len(boxes), -1)
        index = np.flatnonzero(flat.sum(axis=0) >= 2)
        values = np.array([self.logits.get(name, 0.0) for name in self._names], np.float32)
        logits = np.where(flat[:, index], values[:, None], np.float32(-1.0))
        decoded.contested = ContestedPixels(index=index, logits=logits)
        return decoded


A_BOX, B_BOX = (20, 30, 60, 90), (50, 30, 100, 90)  # columns 50..59 are both


def rect(box) -> np.ndarray:
    mask = np.zeros(SIZE, dtype=bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return mask


def test_exclusive_masks_give_contested_pixels_to_the_highest_logit():
    masks = np.stack([rect(A_BOX), rect(B_BOX), rect((0, 0, 10, 10))])
    index = np.flatnonzero(masks.sum(axis=0).reshape(-1) >= 2)
    logits = np.stack([np.full(index.size, 2.0), np.full(index.size, 5.0), np.zeros(index.size)])
    contested = ContestedPixels(index=index, logits=logits)
    a, b, c = exclusive_masks(masks, contested, [0, 0, 0])
    assert np.array_equal(a, rect(A_BOX) & ~rect(B_BOX)) and np.array_equal(b, rect(B_BOX))
    assert np.shares_memory(c.window, masks) and np.array_equal(c, masks[2])  # not copied
    a, b, _ = exclusive_masks(masks, contested, [0, 1, 0])  # a better class beats a logit
    assert np.array_equal(a, rect(A_BOX)) and np.array_equal(b, rect(B_BOX) & ~rect(A_BOX))
    a, b, c = exclusive_masks(masks, contested, [0, -1, -1])  # a negative class takes nothing
    assert np.array_equal(a, rect(A_BOX)) and not b.any() and not c.any()
    with pytest.raises(ValueError, match="one class per mask"):
        exclusive_masks(masks, contested, [0, 0])


def test_exclusive_masks_measure_on_the_own_mask_and_favour_trusted_tracks():
    """Published masks are exclusive; each track's box is measured on its own mask (A keeps
    its full width although it loses the overlap to B); a coasting track takes no pixel a
    trusted track claims, whatever its logit."""
    decoder = ContestDecoder()
    tracker = PromptTracker(decoder, frame_size=SIZE)
    a, b = tracker.commands.add(box=A_BOX), tracker.commands.add(box=B_BOX)
    decoder.logits = {"a": 2.0, "b": 5.0}
    for frame in range(4):
        decoder.objects = {"a": (A_BOX, 0.9), "b": (B_BOX, 0.9)}
        out = by_id(tracker.step(frame))
        assert not (out[a].mask.dense() & out[b].mask.dense()).any()
        assert np.array_equal(out[a].mask, rect(A_BOX) & ~rect(B_BOX))
        assert np.array_equal(out[b].mask, rect(B_BOX))
        assert out[a].record.box == A_BOX and out[b].record.box == B_BOX  # not (20, 30, 50, 90)
        assert (
            out[a].record.state
            is out[b].record.state
            is (TrackState.TENTATIVE if frame == 0 else TrackState.TRACKED)
        )
    assert close(tracker.tracks[a].predicted_box, A_BOX, 0.5)

    decoder.logits = {"a": 9.0, "b": 5.0}  # A now outbids B, but A is not trusted
    decoder.objects = {"a": (A_BOX, 0.1), "b": (B_BOX, 0.9)}
    out = by_id(tracker.step(4))
    assert out[a].record.state is TrackState.COASTING and out[b].record.state is TrackState.TRACKED
    assert np.array_equal(out[b].mask, rect(B_BOX))
    assert np.array_equal(out[a].mask, rect(A_BOX) & ~rect(B_BOX))


def test_a_lost_track_takes_no_pixels():
    """A and B both untrusted; A is lost this frame with the higher logit: its share of the
    overlap goes to B (coasting) instead of vanishing with A's empty mask."""
    decoder = ContestDecoder()
    tracker = PromptTracker(decoder, frame_size=SIZE, settings=TrackerConfig(max_coast_frames=1))
    a, b = tracker.commands.add(box=A_BOX), tracker.commands.add(box=B_BOX)
    decoder.logits = {"a": 9.0, "b": 5.0}
    scores = [(0.9, 0.9), (0.9, 0.9), (0.1, 0.9), (0.1, 0.1)]
    for frame, (score_a, score_b) in enumerate(scores):
        decoder.objects = {"a": (A_BOX, score_a), "b": (B_BOX, score_b)}
        out = by_id(tracker.step(frame))
    assert out[a].record.state is TrackState.LOST and out[b].record.state is TrackState.COASTING
    assert not out[a].mask.any()
    assert np.array_equal(out[b].mask, rect(B_BOX))


# --------------------------------------------------------------------------- prompts


def test_prompt_added_mid_stream_appears_exactly_at_its_frame():
    tracker, decoder = make()
    late = tracker.commands.add(box=moving_box(5), frame=5)
    for frame in range(5):
        assert tracker.step(frame) == []
    assert decoder.calls == []
    early = tracker.commands.add(box=moving_box(5, start=(200, 150, 240, 200)), frame=4)
    assert (
        tracker.commands.listing()[0]["pending"]
        and tracker.commands.listing()[0]["start_frame"] == 5
    )
    for frame in range(5, 8):
        decoder.objects = {
            "a": (moving_box(frame), 0.9),
            "b": (moving_box(frame, start=(200, 150, 240, 200)), 0.9),
        }
        assert [o.record.track_id for o in tracker.step(frame)] == [late, early]


def test_points_only_prompt_starts_from_its_mask():
    tracker, decoder = make()
    tid = tracker.commands.add(points=[[40, 60], [5, 5]], labels=[1, 0], frame=2)
    assert tracker.commands.listing()[0]["box"] is None
    for frame in range(2):
        assert tracker.step(frame) == []
    decoder.objects = {"a": (moving_box(2), 0.9)}
    (out,) = tracker.step(2)
    first = decoder.calls[0]
    assert np.isnan(first.boxes[0]).all()
    coords, labels = first.points[0]
    assert coords.shape == (2, 2) and labels.tolist() == [1, 0]
    assert out.record.track_id == tid and out.record.state is TrackState.TENTATIVE
    assert out.record.box == moving_box(2)
    decoder.objects = {"a": (moving_box(3), 0.9)}
    (out,) = tracker.step(3)
    assert decoder.calls[1].points is None  # points hold for the first frame only
    assert close(decoder.calls[1].boxes[0], moving_box(2), 0.5)
    assert out.record.state is TrackState.TRACKED and out.record.box == moving_box(3)


def test_points_only_prompt_on_nothing_is_lost_once():
    tracker, decoder = make()
    tid = tracker.commands.add(points=[[300, 200]], labels=[1])
    decoder.objects = {"a": (moving_box(0), 0.9)}
    (out,) = tracker.step(0)
    assert out.record.track_id == tid and out.record.state is TrackState.LOST and not out.mask.any()
    assert tracker.step(1) == []


def test_a_correction_queued_while_its_points_prompt_fails_brings_it_back() -> None:
    """The points-only prompt finds nothing in the frame under way (lost) while a correction
    of it is queued: the correction starts it again, at the box, at the next frame."""
    tracker, decoder = make()
    tid = tracker.commands.add(points=[[300, 200]], labels=[1])
    decoder.objects = {"a": (moving_box(0), 0.9)}
    decoder.during = lambda: tracker.commands.update(tid, moving_box(1))
    (out,) = tracker.step(0)
    assert out.record.state is TrackState.LOST
    decoder.during = None
    decoder.objects = {"a": (moving_box(1), 0.9)}
    (out,) = tracker.step(1)
    assert out.record.track_id == tid and out.record.state is TrackState.TENTATIVE
    assert out.record.box == moving_box(1)


def test_update_moves_a_track():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    for frame in range(5):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    jumped = (200, 120, 240, 180)  # e.g. a robot tells us it picked the object up
    tracker.commands.update(tid, jumped)
    decoder.objects = {"a": (jumped, 0.9)}
    (out,) = tracker.step(5)
    assert decoder.calls[-1].mask_logits == [None]  # old logits describe the old place
    assert close(decoder.calls[-1].boxes[0], jumped, 0.0)
    assert (out.record.track_id, out.record.state, out.record.box) == (
        tid,
        TrackState.TRACKED,
        jumped,
    )
    decoder.objects = {"a": (jumped, 0.9)}
    (out,) = tracker.step(6)
    assert out.record.box == jumped and out.record.state is TrackState.TRACKED


def test_mask_prompt_only_after_a_trusted_measurement():
    tracker, decoder = make()
    tracker.commands.add(box=moving_box(0))
    scores = [0.9, 0.9, 0.1, 0.9, 0.9]
    for frame, score in enumerate(scores):
        decoder.objects = {"a": (moving_box(frame), score)}
        tracker.step(frame)
    passed = [call.mask_logits[0] for call in decoder.calls]
    assert passed[0] is None  # first frame: nothing yet
    assert passed[1] is not None and np.all(passed[1] == 100)  # call 1, row 0
    assert passed[2] is not None and np.all(passed[2] == 200)
    assert passed[3] is None  # frame 2 was untrusted
    assert passed[4] is not None and np.all(passed[4] == 400)

    tracker, decoder = make(TrackerConfig(use_mask_prompt=False))
    tracker.commands.add(box=moving_box(0))
    for frame in range(3):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    assert all(call.mask_logits == [None] for call in decoder.calls)


def test_disagreeing_measurement_is_not_trusted():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    for frame in range(5):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    # A confident mask that spills over a big neighbour: IoU with the prediction < 0.3.
    x1, y1, _, _ = moving_box(5)
    decoder.objects = {"a": ((x1, y1, x1 + 200, y1 + 140), 0.95)}
    out = by_id(tracker.step(5))[tid]
    assert out.record.state is TrackState.COASTING
    assert close(out.record.box, moving_box(5), 2.0)


def test_track_id_limit():
    assert MAX_TRACK_ID == 65535  # 16-bit id PNGs past 255 (pipeline.outputs.files)
    tracker, _ = make()
    ids = [tracker.commands.add(box=(0, 0, 10, 10)) for _ in range(300)]
    assert ids == list(range(1, 301))  # past the old 8-bit limit of 255
    assert tracker.commands.add(box=(0, 0, 10, 10), track_id=MAX_TRACK_ID) == MAX_TRACK_ID
    with pytest.raises(ValueError, match="track id limit reached"):
        tracker.commands.add(box=(0, 0, 10, 10))
    tracker.commands.remove(7)
    with pytest.raises(ValueError, match="track id limit reached"):  # ids are never reused
        tracker.commands.add(box=(0, 0, 10, 10))
    assert tracker.commands.add(box=(0, 0, 10, 10), track_id=7) == 7  # unless asked for explicitly
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        tracker.commands.add(box=(0, 0, 10, 10), track_id=MAX_TRACK_ID + 1)
    assert len(tracker.commands.listing()) == 301


def test_tracks_at_once_limit():
    tracker, _ = make()
    for _ in range(MAX_TRACKS_AT_ONCE):
        tracker.commands.add(box=(0, 0, 10, 10))
    with pytest.raises(ValueError, match="too many tracks at once"):
        tracker.commands.add(box=(0, 0, 10, 10))
    with pytest.raises(ValueError, match="too many tracks at once"):
        tracker.commands.add(box=(0, 0, 10, 10), track_id=60000)
    tracker.commands.remove(1)
    assert tracker.commands.add(box=(0, 0, 10, 10)) == MAX_TRACKS_AT_ONCE + 1  # room again


# --------------------------------------------------------------------------- bad input


OK_BOX = (100, 100, 140, 150)
BAD_COMMANDS = [
    (lambda t: t.commands.add(), "box or points"),
    (lambda t: t.commands.add(box=(math.nan, 0, 10, 10)), "NaN or infinite"),
    (lambda t: t.commands.add(box=(0, 0, math.inf, 10)), "NaN or infinite"),
    (lambda t: t.commands.add(box=(10, 10, 10, 20)), "must be greater than"),
    (lambda t: t.commands.add(box=(20, 10, 10, 20)), "must be greater than"),
    (lambda t: t.commands.add(box=(1, 2, 3)), r"must be \[x1, y1, x2, y2\]"),
    (lambda t: t.commands.add(box="abcd"), "box must be numbers"),
    (lambda t: t.commands.add(box=(400, 10, 500, 50)), "outside the 320x240 image"),
    (lambda t: t.commands.add(box=(-50, -50, 0, -1)), "lies outside"),
    (lambda t: t.commands.add(points=[1, 2], labels=[1]), r"points must have shape \(K, 2\)"),
    (lambda t: t.commands.add(points=[[1, 2], [3, 4]], labels=[1]), "one entry per point"),
    (
        lambda t: t.commands.add(points=[[1, 2]], labels=[2]),
        r"1 \(foreground\) or 0 \(background\)",
    ),
    (lambda t: t.commands.add(box=OK_BOX, labels=[1]), "labels were given without points"),
    (lambda t: t.commands.add(points=[[1, 2]], labels=[0]), "foreground point"),
    (
        lambda t: t.commands.add(points=[[1000, 2]], labels=[1]),
        "points .* lies outside the 320x240",
    ),
    (lambda t: t.commands.add(box=OK_BOX, track_id=1), "track_id 1 is already in use"),
    (
        lambda t: t.commands.add(box=OK_BOX, track_id=MAX_TRACK_ID + 1),
        r"track_id must be an integer in 1\.\.65535",
    ),
    (lambda t: t.commands.add(box=OK_BOX, frame=-1), "frame must be a frame index"),
    (lambda t: t.commands.update(99, OK_BOX), "unknown track id 99"),
    (lambda t: t.commands.update(1, (0, 0, math.nan, 5)), "NaN"),
    (lambda t: t.commands.update(1, (50, 50, 10, 60)), "must be greater than"),
    (lambda t: t.commands.remove(99), "unknown track id 99"),
    (lambda t: t.step(2), "frame_index must increase"),
]


@pytest.mark.parametrize(("command", "message"), BAD_COMMANDS)
def test_bad_commands_raise_and_leave_tracks_alone(command, message):
    tracker, decoder = make()
    start_b = (200, 150, 240, 200)
    tracker.commands.add(box=moving_box(0))
    tracker.commands.add(box=start_b)
    tracker.commands.add(box=OK_BOX, frame=50)  # a pending prompt must survive too

    def scene(frame):
        decoder.objects = {"a": (moving_box(frame), 0.9), "b": (start_b, 0.9)}

    for frame in range(3):
        scene(frame)
        tracker.step(frame)
    before = tracker.commands.listing()
    filters = {tid: (t.kf.x.copy(), t.kf.P.copy()) for tid, t in tracker.tracks.items()}
    with pytest.raises(ValueError, match=message):
        command(tracker)
    assert tracker.commands.listing() == before
    for tid, (x, p) in filters.items():
        assert np.array_equal(tracker.tracks[tid].kf.x, x)
        assert np.array_equal(tracker.tracks[tid].kf.P, p)
    scene(3)
    assert [o.record.state for o in tracker.step(3)] == [TrackState.TRACKED] * 2
    assert tracker.commands.add(box=OK_BOX) == 4  # a rejected add used up no id


@pytest.mark.parametrize(
    ("fault", "message"),
    [("raise", "CUDA out of memory"), ("malformed", "malformed batch: masks must be bool")],
)
def test_failing_decoder_changes_nothing_and_the_frame_can_be_retried(fault, message):
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    for frame in range(3):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    x, before = tracker.tracks[tid].kf.x.copy(), tracker.commands.listing()
    decoder.objects = {"a": (moving_box(3), 0.9)}
    decoder.fault = fault
    with pytest.raises(RuntimeError, match=message):
        tracker.step(3)
    assert np.array_equal(tracker.tracks[tid].kf.x, x) and tracker.commands.listing() == before
    decoder.fault = None
    (out,) = tracker.step(3)
    assert out.record.state is TrackState.TRACKED and out.record.box == moving_box(3)


def test_frame_size_known_only_at_the_first_frame():
    decoder = SceneDecoder()
    tracker = PromptTracker(decoder)
    good = tracker.commands.add(box=moving_box(0))
    outside = tracker.commands.add(box=(1000, 1000, 1100, 1100))  # checked once the size is known
    with pytest.raises(RuntimeError, match="set_frame_size"):
        tracker.step(0)
    tracker.set_frame_size(SIZE)
    decoder.objects = {"a": (moving_box(0), 0.9)}
    outputs = by_id(tracker.step(0))
    assert outputs[good].record.state is TrackState.TENTATIVE
    assert outputs[outside].record.state is TrackState.LOST and not outputs[outside].mask.any()
    assert [row["track_id"] for row in tracker.commands.listing()] == [good]
    with pytest.raises(ValueError, match="frame_size"):
        tracker.set_frame_size((0, 320))


def scaled(box, sx: float, sy: float) -> tuple[int, ...]:
    x1, y1, x2, y2 = box
    return (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))


def test_frame_size_change_rescales_tracks_and_pending_prompts():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    later_box = tracker.commands.add(box=(100, 100, 140, 150), frame=50)
    later_points = tracker.commands.add(points=[[150, 20], [5, 5]], labels=[1, 0], frame=50)
    for frame in range(10):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    track = tracker.tracks[tid]
    x, p = track.kf.x.copy(), track.kf.P.copy()

    new_size, sx, sy = (360, 640), 2.0, 1.5  # another aspect ratio too
    tracker.set_frame_size(new_size)
    s = np.diag([sx, sy, sx, sy] * 2)
    assert np.allclose(track.kf.x, s @ x)  # positions, sizes and velocities
    assert np.allclose(track.kf.P, s @ p @ s.T)
    assert track.last_mask_logits is None  # they lie on the old frame's grid
    assert tracker.commands.listing()[1]["box"] == [200.0, 150.0, 280.0, 225.0]

    decoder.size = new_size
    for frame in [*range(10, 20), 50]:
        decoder.objects = {
            "a": (scaled(moving_box(frame), sx, sy), 0.9),
            "b": ((200, 150, 280, 225), 0.9),
            "c": ((280, 10, 320, 60), 0.9),
        }
        out = by_id(tracker.step(frame))
        assert out[tid].record.state is TrackState.TRACKED
        assert out[tid].mask.frame_size == new_size
        assert close(out[tid].record.box, scaled(moving_box(frame), sx, sy), 1.5)
        if frame == 10:
            assert decoder.calls[-1].mask_logits == [None]
            assert close(decoder.calls[-1].boxes[0], scaled(moving_box(frame), sx, sy), 3.0)
    assert np.allclose(track.kf.x[4:6, 0], [VELOCITY[0] * sx, VELOCITY[1] * sy], atol=0.1)
    call = decoder.calls[-1]
    assert np.array_equal(call.boxes[1], [200, 150, 280, 225])
    assert np.allclose(call.points[2][0], [[300, 30], [10, 7.5]])
    assert out[later_box].record.box == (200, 150, 280, 225)
    assert out[later_points].record.box == (280, 10, 320, 60)


# --------------------------------------------------------------------------- lose_all


def test_lose_all_reports_running_tracks_lost_and_keeps_pending_prompts():
    tracker, decoder = make()
    a = tracker.commands.add(box=moving_box(0))
    b = tracker.commands.add(box=(200, 150, 260, 210))
    later = tracker.commands.add(box=(100, 100, 140, 150), frame=50)  # pending until frame 50
    still = {"a": (moving_box(0), 0.9), "b": ((200, 150, 260, 210), 0.9)}
    for frame in range(4):
        decoder.objects = {**still, "a": (moving_box(frame), 0.9)}
        tracker.step(frame)
    decoder.objects = {"a": (moving_box(4), 0.9), "b": ((200, 150, 260, 210), 0.2)}
    assert by_id(tracker.step(4))[b].record.state is TrackState.COASTING
    expected = {
        tid: (
            tracker.tracks[tid].predicted_box,
            tracker.tracks[tid].frames_since_update,
            tracker.tracks[tid].last_score,
            tracker.tracks[tid].last_innovation,
        )
        for tid in (a, b)
    }
    calls = len(decoder.calls)

    lost = tracker.lose_all()

    assert [out.record.track_id for out in lost] == [a, b]
    for out in lost:
        box, frames_since_update, score, innovation = expected[out.record.track_id]
        assert out.record.state is TrackState.LOST
        assert out.mask.frame_size == SIZE and out.mask.window.dtype == bool
        assert not out.mask.any()
        assert close(out.record.box, box, 1e-6)
        assert out.record.frames_since_update == frames_since_update
        assert out.record.score == score and out.record.innovation == innovation
    lost_b = by_id(lost)[b].record
    assert lost_b.frames_since_update == 1 and lost_b.score == pytest.approx(0.2)
    assert len(decoder.calls) == calls  # nothing decoded
    assert dict(tracker.tracks) == {}
    assert [(row["track_id"], row["pending"]) for row in tracker.commands.listing()] == [
        (later, True)
    ]
    assert tracker.lose_all() == []  # already gone: reported once
    for tid in (a, b):
        # A lost track could come back with an update; removed, it is forgotten.
        tracker.commands.remove(tid)
        with pytest.raises(ValueError, match="unknown track id"):
            tracker.commands.update(tid, moving_box(5))

    # The lost tracks are not decoded again; the pending prompt starts at its frame and new
    # prompts get fresh ids.
    decoder.objects = {"c": ((100, 100, 140, 150), 0.9)}
    assert tracker.step(5) == []
    assert len(decoder.calls) == calls
    (out,) = tracker.step(50)
    assert out.record.track_id == later and out.record.state is TrackState.TENTATIVE
    assert tracker.commands.add(box=moving_box(0)) == later + 1


def test_lose_all_without_tracks():
    tracker = PromptTracker(SceneDecoder())  # frame size unknown yet
    pending = tracker.commands.add(box=moving_box(0))
    assert tracker.lose_all() == []
    assert [row["track_id"] for row in tracker.commands.listing()] == [pending]
    tracker, _ = make()
    assert tracker.lose_all() == []


def test_lose_all_forgets_a_corrected_track():
    tracker, decoder = make()
    tid = tracker.commands.add(box=moving_box(0))
    decoder.objects = {"a": (moving_box(0), 0.9)}
    tracker.step(0)
    tracker.commands.update(tid, moving_box(3))  # restarts there at the next step
    (out,) = tracker.lose_all()
    assert out.record.track_id == tid and out.record.state is TrackState.LOST
    assert close(out.record.box, moving_box(3), 1e-6)  # the corrected box, not the old one
    calls = len(decoder.calls)
    assert tracker.step(1) == []  # no stale restart left behind
    assert len(decoder.calls) == calls


def _embedding_message(
    frame: int, session: int, capture_time: float, size: tuple[int, int] = SIZE
) -> EmbeddingMessage:
    """An embedding as an encoder of image size 32 (a 2x2 grid) sends it."""
    meta = FrameMeta("cam0", frame, frame, frame, (1, 25), capture_time, session=session)
    return EmbeddingMessage(
        meta=meta,
        embedding=np.zeros((256, 2, 2), np.float16),
        embedding_dtype="float16",
        original_size=size,
        input_size=resized_shape(*size, 32),
    )


def test_tracker_node_coasts_through_a_short_outage_and_loses_tracks_after_a_long_one():
    """A new source session (the camera reconnected): after a gap shorter than
    lost_after_gap_s the tracks carry on; after a longer one every track is reported lost."""
    node = TrackerNode(TrackerConfig(lost_after_gap_s=5.0), weights="unused.pt", image_size=256)
    tracker, decoder = make()
    node.tracker = tracker
    tid = tracker.commands.add(box=moving_box(0))
    for frame in range(4):
        decoder.objects = {"a": (moving_box(frame), 0.9)}
        assert node._after_outage(_embedding_message(frame, 0, 100.0 + frame * 0.1)) == []
        tracker.step(frame)
    # Reconnected 2 s later: nothing is lost, the track is still followed.
    assert node._after_outage(_embedding_message(4, 1, 102.3)) == []
    decoder.objects = {"a": (moving_box(4), 0.9)}
    assert by_id(tracker.step(4))[tid].record.state is TrackState.TRACKED
    assert node.counters == {"outages_coasted": 1}
    # Reconnected 8 s after the last frame: the track is reported lost and forgotten.
    lost = node._after_outage(_embedding_message(5, 2, 110.3))
    assert [(out.record.track_id, out.record.state) for out in lost] == [(tid, TrackState.LOST)]
    assert not lost[0].mask.any()
    assert dict(tracker.tracks) == {}
    assert node.counters["tracks_lost_to_outages"] == 1
    assert node.detail["last_outage_s"] == pytest.approx(8.0)


class NodeSceneDecoder(SceneDecoder):
    """SceneDecoder in SamMaskDecoder's place in a TrackerNode: the frame size is that of
    the embedding the node hands it with each step."""

    model = SimpleNamespace(device=torch.device("cpu"))

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        self.size = tuple(image.original_size)
        return super().__call__(image, boxes, mask_logits, points)


def test_tracker_node_follows_a_mid_stream_resolution_change():
    decoder = NodeSceneDecoder()
    node = TrackerNode(
        TrackerConfig(),
        weights="unused.pt",
        image_size=32,  # a 2x2 embedding
        decoder=decoder,  # type: ignore[arg-type]
    )
    node.setup()
    tid = node.tracker.commands.add(box=moving_box(0))
    for frame in range(12):
        size, sx, sy = (SIZE, 1.0, 1.0) if frame < 6 else ((480, 640), 2.0, 2.0)
        decoder.objects = {"a": (scaled(moving_box(frame), sx, sy), 0.9)}
        (msg,) = node.process(_embedding_message(frame, 0, 100.0 + frame, size))
        assert isinstance(msg, MaskMessage)
        assert msg.frame_size == size and msg.dense_masks().shape == (1, *size)
        (record,) = msg.tracks
        assert record.track_id == tid
        assert record.state == ("tentative" if frame == 0 else "tracked")
        assert close(record.box, scaled(moving_box(frame), sx, sy), 2.0)
    assert node.tracker.frame_size == (480, 640)
    assert node.counters["frame_size_changes"] == 1


def test_a_restarted_live_tracker_goes_on_with_the_tracks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live tracker keeps its tracks in its state directory (every frame here: the
    interval is 0); one started after it died restores them and goes on with the same ids,
    boxes and states as the one that died would have. A tracker that finds no state there
    starts from its prompts."""
    monkeypatch.setattr(tracker_node, "LIVE_STATE_INTERVAL_S", 0.0)
    state = tmp_path / "tracker"
    config = TrackerConfig(prompts=(PromptConfig(box=moving_box(0)),))

    def node_on(decoder: NodeSceneDecoder) -> TrackerNode:
        node = TrackerNode(
            config,
            weights="unused.pt",
            image_size=32,
            live_state=state,
            decoder=decoder,  # type: ignore[arg-type]
        )
        node.setup()
        return node

    first_decoder = NodeSceneDecoder()
    first = node_on(first_decoder)
    assert "restored_after_frame" not in first.detail  # no state yet: the prompts
    added = first.handle_command(PromptCommand(op="add", box=(60, 10, 90, 40)))
    assert added.ok
    for frame in range(5):
        first_decoder.objects = {"a": (moving_box(frame), 0.9), "b": ((60, 10, 90, 40), 0.8)}
        first.process(_embedding_message(frame, 0, 100.0 + frame))
    # The first tracker dies here, once its writer thread has saved the state after frame 4
    # (the latest): a new one restores it and publishes what the first would have next.
    deadline = time.monotonic() + 60
    while resume.saved_tracker_frames(state) != [4] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resume.saved_tracker_frames(state) == [4]
    second_decoder = NodeSceneDecoder()
    second = node_on(second_decoder)
    assert second.detail["restored_after_frame"] == 4
    first_decoder.objects = {"a": (moving_box(5), 0.9), "b": ((60, 10, 90, 40), 0.8)}
    second_decoder.objects = first_decoder.objects
    (expected,) = first.process(_embedding_message(5, 0, 105.0))
    (got,) = second.process(_embedding_message(5, 0, 105.0))
    assert [t.track_id for t in got.tracks] == [1, added.track_id]
    assert got.tracks == expected.tracks
    assert all(t.state == "tracked" for t in got.tracks)


def test_snapshot_restore_continues_exactly():
    """A tracker restored from a snapshot (through the files --resume uses) goes on exactly
    as the one that made it: same boxes, states, scores, innovations and mask prompts."""

    def scene(frame: int) -> dict:
        occluded = 0.1 if frame in range(9, 12) else 0.9
        return {"a": (moving_box(frame), occluded), "b": ((60, 10, 90, 40), 0.8)}

    original, decoder = make()
    original.commands.add(box=moving_box(0))
    original.commands.add(box=(60, 10, 90, 40))
    original.commands.add(box=(5, 5, 20, 20), frame=14)  # still pending at the snapshot
    for frame in range(8):
        decoder.objects = scene(frame)
        original.step(frame)
    with tempfile.TemporaryDirectory() as tmp:
        resume.save_tracker_snapshots(tmp, {7: original.snapshot()})
        data, arrays = resume.load_tracker_snapshot(tmp, 7)
    restored, restored_decoder = make()
    restored.restore(data, arrays)
    for frame in range(8, 20):
        decoder.objects = restored_decoder.objects = scene(frame)
        expected, got = original.step(frame), restored.step(frame)
        assert [o.record for o in got] == [o.record for o in expected]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(got, expected, strict=True))
        if frame == 8:  # the saved logits are the first frame's mask prompts, bit for bit
            prompts = zip(
                restored_decoder.calls[-1].mask_logits, decoder.calls[-1].mask_logits, strict=True
            )
            assert all((a is None and b is None) or np.array_equal(a, b) for a, b in prompts)
            assert any(a is not None for a in restored_decoder.calls[-1].mask_logits)
    assert {o.record.track_id for o in got} == {1, 2, 3}
    with pytest.raises(ValueError, match="not a prompt tracker snapshot"):
        restored.restore({"tracks": [{"id": 1}]}, {})


def test_a_lost_track_comes_back_with_an_update():
    tracker, decoder = make(TrackerConfig(max_coast_frames=1))
    tid = tracker.commands.add(box=moving_box(0))
    decoder.objects = {"a": (moving_box(0), 0.9)}
    tracker.step(0)
    decoder.objects = {}  # gone: coasts, then lost
    states = [by_id(tracker.step(frame))[tid].record.state for frame in (1, 2)]
    assert states == [TrackState.COASTING, TrackState.LOST]
    assert tid not in tracker.tracks
    with pytest.raises(ValueError, match="unknown track id 9"):
        tracker.commands.update(9, moving_box(3))
    tracker.commands.update(tid, moving_box(3))  # the user points at it again
    decoder.objects = {"a": (moving_box(3), 0.9)}
    (out,) = tracker.step(3)
    assert out.record.track_id == tid and out.record.state is TrackState.TENTATIVE
    assert close(out.record.box, moving_box(3), 1.0)
    with pytest.raises(ValueError, match="already in use"):
        tracker.commands.add(box=moving_box(3), track_id=tid)


def test_a_configured_points_prompt_without_labels_is_foreground() -> None:
    """`tracker.prompts` documents labels None as every point foreground (as `predict`
    reads points): the tracker node starts such a prompt's track, where the tracker's own
    point check used to refuse points without labels and fail the node's setup."""
    config = TrackerConfig(prompts=(PromptConfig(points=((70.0, 20.0), (75.0, 30.0))),))
    decoder = NodeSceneDecoder()
    node = TrackerNode(
        config,
        weights="unused.pt",
        image_size=32,
        decoder=decoder,  # type: ignore[arg-type]
    )
    node.setup()
    [listing] = node.tracker.commands.listing()
    assert listing["pending"] is True and listing["box"] is None
    decoder.objects = {"a": ((60, 10, 90, 40), 0.9)}
    (msg,) = node.process(_embedding_message(0, 0, 100.0))
    coords, labels = decoder.calls[0].points[0]  # what the prompt started with
    assert labels.tolist() == [1, 1]
    assert coords.tolist() == [[70.0, 20.0], [75.0, 30.0]]
    assert [(t.track_id, t.state) for t in msg.tracks] == [(listing["track_id"], "tentative")]
