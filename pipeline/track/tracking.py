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

Masks are ``RegionMask`` (``pipeline.wire.masks``): the window of the frame that holds an object's
pixels and the bool array inside it. Measurement and exclusivity work on the windows, so what
an object costs here follows its area, not the frame's.

Coordinates are ``(x1, y1, x2, y2)`` pixels of the original frame with exclusive ``x2``/``y2``
(a mask whose True pixels span columns 3..7 has ``x1 = 3, x2 = 8``).
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np
from filterpy.kalman import KalmanFilter

from pipeline.config import RunConfig, TrackerConfig, validate_config
from pipeline.track.prompts import check_box, check_points
from pipeline.wire.masks import RegionMask, as_region_masks, is_int, tight_box
from pipeline.wire.messages import MAX_TRACK_ID, TrackRecord, TrackState

if TYPE_CHECKING:  # the tracker runs any decoder; only SAM's needs torch
    from pipeline.predictor import ImageEmbedding

Box = tuple[float, float, float, float]

MAX_TRACKS_AT_ONCE = 4096
"""Tracks and pending prompts a tracker holds at one time; an add past it is refused. A
frame's masks message describes every track in its header (about 200 bytes each), and a
header is at most ``messages.MAX_HEADER_BYTES`` (1 MiB, some 5000 tracks): past that the
next node would reject the frame's masks."""

BETWEEN_INTERVAL_S = 0.01
"""When ``step`` is given ``between``, it is called about this often while the decoder works
on the frame (in a worker thread): a control command waits for this, not for a frame of
hundreds of tracks (seconds on a CPU)."""

_MIN_SIZE = 1.0  # pixels; a box narrower than one pixel cannot prompt the decoder
_INIT_POSITION_SCALE = 10.0  # a prompt box is this many measurement-noise stds uncertain
_INIT_VELOCITY_STD = 50.0  # pixels per frame; unknown at creation, learnt from two measurements
# measure_box labels components on the mask cropped to the reference box grown by this many
# of its longer sides (plus _CROP_PAD pixels) on every side: far more than an object moves
# between frames, and a kept component that reaches the crop's edge is redone on the frame.
_CROP_MARGIN = 1.0
_CROP_PAD = 16


# --------------------------------------------------------------------------- box helpers


def box_to_state(box: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2)`` -> ``[cx, cy, w, h]`` (float64, shape (4,))."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    return np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1])


def state_to_box(z: Sequence[float] | np.ndarray) -> Box:
    """``[cx, cy, w, h, ...]`` (extra entries such as velocities are ignored) -> box."""
    cx, cy, w, h = (float(v) for v in np.asarray(z, dtype=np.float64).reshape(-1)[:4])
    return (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes; 0.0 when both are empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (
        max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
        + max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
        - inter
    )
    return inter / union if union > 0.0 else 0.0


def measure_box(mask: np.ndarray | RegionMask, reference: Sequence[float] | None) -> Box | None:
    """Box of the parts of an (H, W) bool mask that agree with ``reference``; None if empty.

    The parts are the mask's 8-connected components. Kept: every component with a pixel in
    ``reference`` (a track's predicted box, or its prompt box on its first frame); when none
    has one (or ``reference`` is None), the largest component. The box is the union of the
    kept components' boxes, exclusive x2/y2, like ``mask_box`` (which measures every pixel).
    A RegionMask is measured on its window: the answer is the one its full frame would give.
    """
    if isinstance(mask, RegionMask):
        region = mask
    else:
        if mask.ndim != 2:
            raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
        if mask.shape[0] == 0 or mask.shape[1] == 0:
            return None
        height, width = mask.shape
        region = RegionMask(mask.shape, (0, 0, width, height), mask.astype(bool, copy=False))
    height, width = region.frame_size
    wx1, wy1, wx2, wy2 = region.box
    window = region.window
    if reference is None:
        return _kept_components_box(window, None, (wx1, wy1))[0]
    rx1, ry1, rx2, ry2 = (float(v) for v in reference)
    # Pixels the reference box touches (pixel c spans [c, c + 1)), clipped to the frame.
    ref = (
        min(max(math.floor(rx1), 0), width),
        min(max(math.floor(ry1), 0), height),
        min(max(math.ceil(rx2), 0), width),
        min(max(math.ceil(ry2), 0), height),
    )
    margin = _CROP_MARGIN * max(rx2 - rx1, ry2 - ry1) + _CROP_PAD
    crop = (
        max(math.floor(rx1 - margin), 0),
        max(math.floor(ry1 - margin), 0),
        min(math.ceil(rx2 + margin), width),
        min(math.ceil(ry2 + margin), height),
    )
    if crop[2] > crop[0] and crop[3] > crop[1] and crop != (0, 0, width, height):
        # Labelling is linear in the pixels it sees: on the crop it costs a fraction of the
        # frame. The answer is exact unless a kept component reaches a cut edge of the crop
        # (it may go on outside) or no component overlaps (the largest may be outside).
        # Outside the window the mask is False: the crop's part of the window holds all of
        # the crop's pixels, and so gives the crop's components.
        sx1, sy1 = max(crop[0], wx1), max(crop[1], wy1)
        sx2, sy2 = max(min(crop[2], wx2), sx1), max(min(crop[3], wy2), sy1)
        part = window[sy1 - wy1 : sy2 - wy1, sx1 - wx1 : sx2 - wx1]
        local_ref = (ref[0] - sx1, ref[1] - sy1, ref[2] - sx1, ref[3] - sy1)
        box, overlapped = _kept_components_box(part, local_ref, (sx1, sy1))
        if box is not None and overlapped:
            cut = (crop[0] > 0, crop[1] > 0, crop[2] < width, crop[3] < height)
            at_cut = (
                (cut[0] and box[0] <= crop[0])
                or (cut[1] and box[1] <= crop[1])
                or (cut[2] and box[2] >= crop[2])
                or (cut[3] and box[3] >= crop[3])
            )
            if not at_cut:
                return box
        elif box is None and not window.any():
            return None
    # The whole mask: its window holds every pixel.
    local_ref = (ref[0] - wx1, ref[1] - wy1, ref[2] - wx1, ref[3] - wy1)
    return _kept_components_box(window, local_ref, (wx1, wy1))[0]


def _kept_components_box(
    mask: np.ndarray, ref: tuple[int, int, int, int] | None, offset: tuple[int, int]
) -> tuple[Box | None, bool]:
    """(box of the kept components shifted by ``offset`` (x, y), whether any overlapped
    ``ref`` (pixel bounds x1, y1, x2, y2 in ``mask``)); (None, False) for an empty mask."""
    # Labelling costs per pixel it sees: first cut the mask down to the box of its pixels
    # (``tight_box``: two cheap reductions), often a small part of the crop or frame.
    bounds = tight_box(mask)
    if bounds is None:
        return None, False
    left, top, right, bottom = bounds
    tight = mask[top:bottom, left:right]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        tight.astype(np.uint8), connectivity=8
    )
    kept = np.zeros(0, dtype=np.int64)
    if ref is not None:
        x1, y1 = max(ref[0] - left, 0), max(ref[1] - top, 0)
        x2, y2 = min(ref[2] - left, tight.shape[1]), min(ref[3] - top, tight.shape[0])
        if x2 > x1 and y2 > y1:
            seen = np.bincount(labels[y1:y2, x1:x2].ravel(), minlength=count)
            kept = np.flatnonzero(seen[1:]) + 1  # label 0 is the background
    overlapped = kept.size > 0
    if not overlapped:
        kept = np.array([1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))])
    chosen = stats[kept]
    x1s, y1s = chosen[:, cv2.CC_STAT_LEFT], chosen[:, cv2.CC_STAT_TOP]
    x2s = x1s + chosen[:, cv2.CC_STAT_WIDTH]
    y2s = y1s + chosen[:, cv2.CC_STAT_HEIGHT]
    ox, oy = offset[0] + left, offset[1] + top
    box = (
        float(x1s.min() + ox),
        float(y1s.min() + oy),
        float(x2s.max() + ox),
        float(y2s.max() + oy),
    )
    return box, overlapped


def _as_box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def _inside(box: Box, frame_size: tuple[int, int]) -> bool:
    """True when the box overlaps the frame with positive area."""
    height, width = frame_size
    return box[2] > 0 and box[3] > 0 and box[0] < width and box[1] < height


def _clip(box: Box, frame_size: tuple[int, int]) -> Box:
    height, width = frame_size
    # Written out, not np.clip or a loop: this runs per track per frame (1.2 us; a
    # generator over the four coordinates took 2.3 us, np.clip more still).
    return (
        min(max(box[0], 0.0), width),
        min(max(box[1], 0.0), height),
        min(max(box[2], 0.0), width),
        min(max(box[3], 0.0), height),
    )


# --------------------------------------------------------------------------- settings


def _is_real(value: object) -> bool:
    return is_int(value) or isinstance(value, (float, np.floating))


# --------------------------------------------------------------------------- one track


def _transition(dt: int, process_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Constant-velocity F and Q for a step of ``dt`` frames (frames may be dropped live).

    Q is the discrete white-noise-acceleration model per coordinate, so the uncertainty of a
    track grows with the time it coasts, not with the number of calls.
    """
    f = np.eye(8)
    f[:4, 4:] = dt * np.eye(4)
    var = process_noise**2
    q = np.zeros((8, 8))
    q[:4, :4] = np.eye(4) * var * dt**4 / 4.0
    q[:4, 4:] = q[4:, :4] = np.eye(4) * var * dt**3 / 2.0
    q[4:, 4:] = np.eye(4) * var * dt**2
    return f, q


def _keep_size_positive(x: np.ndarray) -> np.ndarray:
    """Clamp w/h of a state column to _MIN_SIZE; a clamped size also stops shrinking."""
    for size, rate in ((2, 6), (3, 7)):
        if x[size, 0] < _MIN_SIZE:
            x[size, 0] = _MIN_SIZE
            x[rate, 0] = max(x[rate, 0], 0.0)
    return x


class Track:
    """One object: a Kalman filter over its box plus the bookkeeping the tracker publishes.

    ``kf`` state: ``[cx, cy, w, h, vcx, vcy, vw, vh]`` (pixels, pixels/frame), measurement
    ``[cx, cy, w, h]``.
    """

    def __init__(self, track_id: int, box: Box, *, settings: TrackerConfig | None = None) -> None:
        self.track_id = track_id
        self.state = TrackState.TENTATIVE
        self.frames_since_update = 0
        self.hits = 0
        self.last_score = 0.0
        self.last_innovation = 0.0
        self.last_mask_logits: np.ndarray | None = None
        self._settings = settings if settings is not None else TrackerConfig()
        self.kf = KalmanFilter(dim_x=8, dim_z=4)
        self.kf.F, self.kf.Q = _transition(1, self._settings.process_noise)
        self.kf.H = np.hstack([np.eye(4), np.zeros((4, 4))])
        self.kf.R = np.eye(4) * self._settings.measurement_noise**2
        self.reset(box)

    @property
    def predicted_box(self) -> Box:
        """Box of the filter's current state (after ``predict()``, the prediction)."""
        return state_to_box(self.kf.x)

    def reset(self, box: Box) -> None:
        """Restart the filter at ``box`` with unknown velocity (used by corrections)."""
        r = self._settings.measurement_noise
        self.kf.x = _keep_size_positive(np.concatenate([box_to_state(box), np.zeros(4)])[:, None])
        self.kf.P = np.diag([(_INIT_POSITION_SCALE * r) ** 2] * 4 + [_INIT_VELOCITY_STD**2] * 4)
        self.last_mask_logits = None  # they describe the old position

    def peek(self, dt: int = 1) -> Box:
        """The box ``predict(dt)`` would return, without changing the filter."""
        f, _ = _transition(dt, self._settings.process_noise)
        return state_to_box(_keep_size_positive(f @ self.kf.x))

    def predict(self, dt: int = 1) -> Box:
        """Advance the filter by ``dt`` frames; returns the predicted box."""
        f, q = _transition(dt, self._settings.process_noise)
        self.kf.predict(F=f, Q=q)
        self.kf.x = _keep_size_positive(self.kf.x)
        return self.predicted_box

    def innovation(self, box: Box) -> float:
        """Mahalanobis distance of a measured box from the current state (no update)."""
        y = box_to_state(box)[:, None] - self.kf.H @ self.kf.x
        s = self.kf.H @ self.kf.P @ self.kf.H.T + self.kf.R
        return math.sqrt(max(0.0, float((y.T @ np.linalg.solve(s, y)).item())))

    def update(self, box: Box) -> None:
        """Fuse a trusted measured box."""
        self.last_innovation = self.innovation(box)
        self.kf.update(box_to_state(box)[:, None])
        self.kf.x = _keep_size_positive(self.kf.x)
        self.hits += 1
        self.frames_since_update = 0

    def rescale(self, sx: float, sy: float) -> None:
        """Express the filter in a frame resized by ``sx`` (x) and ``sy`` (y).

        The state is linear in pixels, so ``x' = S x`` and ``P' = S P S^T`` with
        ``S = diag(sx, sy, sx, sy, sx, sy, sx, sy)``: positions, sizes, their rates and every
        covariance between them stay consistent. R and Q stay: they are the noise of one
        mask box coordinate and of the motion in pixels, whatever the resolution.
        """
        scale = np.diag([sx, sy, sx, sy] * 2)
        self.kf.x = _keep_size_positive(scale @ self.kf.x)
        self.kf.P = scale @ self.kf.P @ scale.T
        # The low-res logits lie on the decoder's grid of the old frame (padded to a square);
        # after a resize they would prompt a shifted mask. One box-only frame is cheap.
        self.last_mask_logits = None


# --------------------------------------------------------------------------- decoder protocol


@dataclass
class ContestedPixels:
    """What decides who gets a pixel that two or more rows' masks claim: every claiming
    row's full-resolution mask logit there. In one of two forms:

    windows: N float32 arrays, row i's logits over its mask's window (``masks[i].box``), as
        a decoder that works on windows has them; the pixels claimed twice lie where windows
        overlap, and are found there.
    index, logits: (P,) int64 flat (row-major) indices into the (H, W) frame of the pixels
        two or more rows' masks claim (ascending), and the (N, P) float32 logit of every row
        at them, as a decoder that works on whole frames has them.
    """

    index: np.ndarray | None = None
    logits: np.ndarray | None = None
    windows: Sequence[np.ndarray] | None = None


@dataclass
class DecodedMasks:
    """One decoder call's answer, rows in the order of the prompts.

    masks: N RegionMask of the frame, each row's own mask (its logits above the threshold,
        whatever the other rows say), or an (N, H, W) bool array (the tracker cuts it into
        windows).
    scores: (N,) predicted IoU scores.
    low_res_logits: (N, h, w) float32 low-res mask logits (SAM: 256x256), fed back as mask
        prompt on the next frame.
    contested: None, or the logits that decide the pixels two or more rows of ``masks``
        claim: then the tracker publishes exclusive masks (``exclusive_masks``); None keeps
        them overlapping.
    """

    masks: Sequence[RegionMask] | np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    contested: ContestedPixels | None = None


def exclusive_masks(
    masks: Sequence[RegionMask] | np.ndarray, contested: ContestedPixels, priority: Sequence[int]
) -> builtins.list[RegionMask]:
    """Own masks -> masks in which no pixel belongs to two rows.

    masks: N RegionMask of one frame (or an (N, H, W) bool array), the rows' own masks;
        contested: the logits where two or more of them are True (either form).
    priority: N classes, 0 first; a negative class takes no pixels (its row comes back
        empty). A contested pixel goes to the row with the highest logit among the rows of
        the best class that claim it (ties: the earlier row); an uncontested pixel stays with
        the one row that claims it. So the union of the result is the union of the own masks
        of the rows that take pixels.
    Returns N RegionMask in the rows' windows; a row that loses nothing is its own mask
    itself (the same object, or for an array a view of it).
    """
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
        height, width = masks.shape[1:]
        regions: Sequence[RegionMask] = [
            RegionMask((height, width), (0, 0, width, height), mask.astype(bool, copy=False))
            for mask in masks
        ]
    else:
        regions = masks
    count = len(regions)
    if len(priority) != count:
        raise ValueError(f"priority needs one class per mask: {count} masks, {len(priority)}")
    classes = np.asarray(priority, dtype=np.int64)
    out = [
        region if classes[row] >= 0 else RegionMask.empty(region.frame_size)
        for row, region in enumerate(regions)
    ]
    if count == 0:
        return out
    if contested.windows is not None:
        return _exclusive_in_windows(regions, contested.windows, classes, out)
    if contested.index is None or contested.logits is None:
        raise ValueError("contested pixels need windows, or index and logits")
    return _exclusive_at_pixels(regions, contested.index, contested.logits, classes, out)


def _exclusive_in_windows(
    regions: Sequence[RegionMask],
    windows: Sequence[np.ndarray],
    classes: np.ndarray,
    out: builtins.list[RegionMask],
) -> builtins.list[RegionMask]:
    """``exclusive_masks`` from every row's logits in its window.

    Rows go one by one over a canvas that keeps, per pixel, the best (class, logit) so far
    and its row: a row takes a pixel it claims when its class is better, or equal with a
    higher logit (so on a tie the earlier row keeps it). Only rows whose window overlaps
    another's can lose pixels, and only those are drawn, on the canvas of their union box.
    """
    if len(windows) != len(regions):
        raise ValueError(f"one logit window per mask: {len(regions)} masks, {len(windows)}")
    active = [
        row
        for row, region in enumerate(regions)
        if classes[row] >= 0 and region.width and region.height
    ]
    if len(active) < 2:
        return out
    boxes = np.array([regions[row].box for row in active], dtype=np.int64)
    overlap = (
        np.minimum(boxes[:, None, 2], boxes[None, :, 2])
        > np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    ) & (
        np.minimum(boxes[:, None, 3], boxes[None, :, 3])
        > np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    )
    np.fill_diagonal(overlap, False)
    rows = [row for row, hit in zip(active, overlap.any(axis=1), strict=True) if hit]
    if not rows:
        return out
    boxes = np.array([regions[row].box for row in rows], dtype=np.int64)
    ox, oy = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    shape = (int(boxes[:, 3].max()) - oy, int(boxes[:, 2].max()) - ox)
    best_class = np.full(shape, np.iinfo(np.int64).max, dtype=np.int64)
    best_logit = np.full(shape, -np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int64)
    places = {}
    for row in rows:
        region, logits = regions[row], windows[row]
        if logits.shape != region.window.shape:
            raise ValueError(
                f"row {row}: logits of {logits.shape} for a {region.window.shape} window"
            )
        x1, y1, x2, y2 = region.box
        place = (slice(y1 - oy, y2 - oy), slice(x1 - ox, x2 - ox))
        places[row] = place
        claimed, here = best_class[place], best_logit[place]
        cls = classes[row]
        takes = region.window & ((cls < claimed) | ((cls == claimed) & (logits > here)))
        claimed[takes] = cls
        here[takes] = logits[takes]
        owner[place][takes] = row
    for row in rows:
        region = regions[row]
        kept = region.window & (owner[places[row]] == row)
        if not np.array_equal(kept, region.window):
            out[row] = RegionMask(region.frame_size, region.box, kept)
    return out


def _exclusive_at_pixels(
    regions: Sequence[RegionMask],
    index: np.ndarray,
    logits: np.ndarray,
    classes: np.ndarray,
    out: builtins.list[RegionMask],
) -> builtins.list[RegionMask]:
    """``exclusive_masks`` from every row's logit at the listed contested pixels."""
    count = len(regions)
    if index.size == 0:
        return out
    width = regions[0].frame_size[1]
    ys, xs = np.divmod(index, width)
    claims = np.zeros((count, index.size), dtype=bool)  # (N, P)
    where: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for row, region in enumerate(regions):
        if classes[row] < 0:
            continue
        x1, y1, x2, y2 = region.box
        inside = np.flatnonzero((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2))
        if inside.size:
            local_y, local_x = ys[inside] - y1, xs[inside] - x1
            claims[row, inside] = region.window[local_y, local_x]
            where[row] = (inside, local_y, local_x)
    ranked = np.where(claims, classes[:, None], np.iinfo(np.int64).max)
    eligible = claims & (ranked == ranked.min(axis=0, keepdims=True))
    winner = np.where(eligible, logits, -np.inf).argmax(axis=0)
    taken = eligible.any(axis=0)
    for row, region in enumerate(regions):
        if classes[row] < 0 or not claims[row].any():
            continue
        lost = claims[row] & ~(taken & (winner == row))
        if not lost.any():
            continue  # won every pixel it claims
        inside, local_y, local_x = where[row]
        gone = lost[inside]
        window = region.window.copy()
        window[local_y[gone], local_x[gone]] = False
        out[row] = RegionMask(region.frame_size, region.box, window)
    return out


class MaskDecoderFn(Protocol):
    """Decodes all tracks' prompts of one frame in one batch (on that frame's embedding)."""

    def __call__(
        self,
        image: ImageEmbedding | None,
        boxes: np.ndarray,
        mask_logits: list[np.ndarray | None],
        points: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ) -> DecodedMasks:
        """Decode N prompts.

        image: the frame's embedding, as ``PromptTracker.step`` was given it.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in original-frame pixels; a row is NaN for a
            points-only prompt.
        mask_logits: N entries, each the track's previous (h, w) low-res logits or None.
        points: None when no prompt has points, else N entries, each None or
            ``(coords (K, 2) float32 x/y pixels, labels (K,) int32 1=foreground 0=background)``.
        Returns each row's own mask; with ``contested`` set when masks are to be exclusive.
        """
        ...


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
        if not _is_real(between_interval_s) or not between_interval_s > 0:
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
                slots.append(_Slot(tid, track, None, _clip(track.predicted_box, size), True, dt))
                continue
            predicted = track.peek(dt)
            if not _inside(predicted, size):
                rejected.append(
                    self._lost_output(
                        tid, predicted, track.last_innovation, track.frames_since_update + dt
                    )
                )
                continue
            slots.append(_Slot(tid, track, None, _clip(predicted, size), False, dt))
        for tid, prompt in due.items():
            # The frame check was deferred when the prompt came before the frame size.
            box_ok = prompt.box is None or _inside(prompt.box, size)
            points_ok = prompt.points is None or _points_inside(prompt.points, size)
            if not (box_ok and points_ok):
                shown = prompt.box if prompt.box is not None else _points_box(prompt)
                rejected.append(self._lost_output(tid, shown, 0.0, 0))
                continue
            box = None if prompt.box is None else _clip(prompt.box, size)
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
        return _checked_decoded(decoded, len(slots), self._frame_size)

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
        predicted = _clip(track.predicted_box, size)

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
            box=_as_box(reported),
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
            box=_as_box(box),
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
                    None if row["box"] is None else _as_box(row["box"]),
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
    return _as_box((*fg.min(axis=0), *(fg.max(axis=0) + 1)))


def _checked_decoded(
    decoded: DecodedMasks, count: int, frame_size: tuple[int, int] | None
) -> DecodedMasks:
    """The decoder's answer with its masks as RegionMasks. The decoder is ours, so a bad
    answer is a bug: RuntimeError, tracks untouched."""
    masks = getattr(decoded, "masks", None)
    scores = getattr(decoded, "scores", None)
    logits = getattr(decoded, "low_res_logits", None)
    contested = getattr(decoded, "contested", None)
    problems = []
    regions: tuple[RegionMask, ...] = ()
    if frame_size is None:
        problems.append("the frame size is unknown")
    elif isinstance(masks, np.ndarray) and (
        masks.dtype != np.bool_ or masks.shape != (count, *frame_size)
    ):
        problems.append(f"masks must be bool {(count, *frame_size)}, got {_describe(masks)}")
    elif not isinstance(masks, (np.ndarray, Sequence)) or len(masks) != count:
        problems.append(f"masks must be {count} RegionMask, got {_describe(masks)}")
    else:
        try:
            regions = as_region_masks(masks, frame_size)
        except ValueError as err:
            problems.append(str(err))
    if (
        not isinstance(scores, np.ndarray)
        or scores.shape != (count,)
        or not np.all(np.isfinite(scores))
    ):
        problems.append(f"scores must be {count} finite numbers, got {_describe(scores)}")
    if not isinstance(logits, np.ndarray) or logits.ndim != 3 or logits.shape[0] != count:
        problems.append(f"low_res_logits must be ({count}, h, w), got {_describe(logits)}")
    if contested is not None:
        problems.extend(_contested_problems(contested, count, regions, frame_size))
    if problems:
        raise RuntimeError("mask decoder returned a malformed batch: " + "; ".join(problems))
    return dataclasses.replace(decoded, masks=regions)


def _contested_problems(
    contested: object,
    count: int,
    regions: tuple[RegionMask, ...],
    frame_size: tuple[int, int] | None,
) -> builtins.list[str]:
    windows = getattr(contested, "windows", None)
    if windows is not None:
        shapes = [getattr(w, "shape", None) for w in windows]
        wanted = [m.window.shape for m in regions]
        if (
            len(shapes) != count
            or (regions and shapes != wanted)
            or not all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in windows)
        ):
            return [f"contested.windows must be float32 logits of the {count} mask windows"]
        return []
    index = getattr(contested, "index", None)
    logits = getattr(contested, "logits", None)
    pixels = frame_size[0] * frame_size[1] if frame_size is not None else 0
    if (
        not isinstance(index, np.ndarray)
        or index.ndim != 1
        or index.dtype.kind not in "iu"
        or (index.size > 0 and (int(index.min()) < 0 or int(index.max()) >= pixels))
    ):
        return [f"contested.index must be flat pixel indices < {pixels}, got {_describe(index)}"]
    if not isinstance(logits, np.ndarray) or logits.shape != (count, index.size):
        return [f"contested.logits must be ({count}, {index.size}), got {_describe(logits)}"]
    return []


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    if isinstance(value, (tuple, builtins.list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
