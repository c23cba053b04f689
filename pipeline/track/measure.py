"""Measuring a track: the box of the parts of its mask that agree with its prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.track.kalman import Box
from pipeline.wire.masks import RegionMask, tight_box

# measure_box labels components on the mask cropped to the reference box grown by this many
# of its longer sides (plus _CROP_PAD pixels) on every side: far more than an object moves
# between frames, and a kept component that reaches the crop's edge is redone on the frame.
_CROP_MARGIN = 1.0
_CROP_PAD = 16


def measure_box(mask: np.ndarray | RegionMask, reference: Sequence[float] | None) -> Box | None:
    """Box of the parts of an (H, W) bool mask that agree with ``reference``; None if empty.

    The parts are the mask's 8-connected components. Kept: every component with a pixel in
    ``reference`` (a track's predicted box, or its prompt box on its first frame); when none
    has one (or ``reference`` is None), the largest component. The box is the union of the
    kept components' boxes, exclusive x2/y2, like ``tight_box`` (which measures every pixel).
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
