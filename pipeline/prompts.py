"""Turning user prompts (Ultralytics nesting) into validated arrays, with errors that say which.

Nesting, as Ultralytics' SAM does it:
- bboxes: one box `[x1, y1, x2, y2]` or several `[[...], [...]]`; each box is one object.
- points: `[x, y]` one point (one object); `[[x, y], [x, y]]` one object per point;
  `[[[x, y], [x, y]]]` several points for one object. labels nest the same way
  (1 foreground, 0 background); without labels every point is foreground.
- a box and points together prompt one object (or N boxes with N point groups, pairwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prompts:
    """Validated prompts in original-image pixels, one row per object.

    boxes: Nx4 float32 or None; points: NxPx2 float32 or None; labels: NxP int32 or None.
    """

    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None


def _as_float_array(value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be numbers, got {value!r}") from err


def check_box(
    box: Any, name: str = "box", frame_size: tuple[int, int] | None = None
) -> tuple[float, float, float, float]:
    """``box`` as (x1, y1, x2, y2) floats; ValueError naming it unless it is 4 finite numbers
    with x1 < x2 and y1 < y2 that overlap the (H, W) ``frame_size`` (when known).

    The one box check: `predict`'s prompts, a run's configured prompts, the tracker's
    commands.
    """
    values = _as_float_array(box, name)
    if values.shape != (4,):
        raise ValueError(f"{name} must be [x1, y1, x2, y2], got {box!r}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} {values.tolist()} has a NaN or infinite coordinate")
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 <= x1:
        raise ValueError(f"{name} {values.tolist()}: x2 ({x2:g}) must be greater than x1 ({x1:g})")
    if y2 <= y1:
        raise ValueError(f"{name} {values.tolist()}: y2 ({y2:g}) must be greater than y1 ({y1:g})")
    if frame_size is not None and not overlaps_frame((x1, y1, x2, y2), frame_size):
        h, w = frame_size
        raise ValueError(f"{name} {values.tolist()} lies outside the {w}x{h} image")
    return (x1, y1, x2, y2)


def check_points(
    points: Any, labels: Any, name: str = "points", frame_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``points`` as (K, 2) float32 x/y and ``labels`` as (K,) int32 (1 foreground, 0
    background; None: every point foreground); ValueError naming them unless they are K >= 1
    finite points with one 0/1 label each, inside the (H, W) ``frame_size`` (when known).

    The one point check: `predict`'s prompts and the tracker's commands.
    """
    if points is None:
        raise ValueError(f"labels were given without {name}")
    coords = _as_float_array(points, name)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(f"{name} must have shape (K, 2) with K >= 1, got shape {coords.shape}")
    marks = np.ones(len(coords)) if labels is None else _as_float_array(labels, "labels")
    if marks.shape != (len(coords),):
        raise ValueError(
            f"labels must have one entry per point: {len(coords)} points, labels of shape "
            f"{marks.shape}"
        )
    if not np.isin(marks, (0, 1)).all():
        raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {marks.tolist()}")
    finite = np.isfinite(coords).all(axis=1)
    good = finite if frame_size is None else finite & points_inside(coords, frame_size)
    if not good.all():
        j = int(np.argmin(good))  # the first bad point
        point, (x, y) = (f"point {j} of {name}" if len(coords) > 1 else name), coords[j]
        if frame_size is None or not finite[j]:
            raise ValueError(f"{point} [{x}, {y}] has a NaN or infinite coordinate")
        h, w = frame_size
        raise ValueError(f"{point} [{x:g}, {y:g}] lies outside the {w}x{h} image")
    return coords.astype(np.float32), marks.astype(np.int32)


def overlaps_frame(box: Sequence[float], frame_size: tuple[int, int]) -> bool:
    """True when the box overlaps the (H, W) frame with positive area (``check_box``'s frame
    check)."""
    height, width = frame_size
    return box[2] > 0 and box[3] > 0 and box[0] < width and box[1] < height


def points_inside(coords: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Per point of (K, 2) x/y ``coords``: whether it lies in the (H, W) frame, edges
    included (``check_points``' frame check)."""
    height, width = frame_size
    return ((coords >= 0) & (coords <= (width, height))).all(axis=1)


def parse_prompts(
    image_size: tuple[int, int],
    bboxes: Any = None,
    points: Any = None,
    labels: Any = None,
) -> Prompts:
    """Normalise and validate prompts for an image of `image_size` (H, W)."""
    boxes_arr: np.ndarray | None = None
    points_arr: np.ndarray | None = None
    labels_arr: np.ndarray | None = None

    if bboxes is not None:
        boxes_arr = _as_float_array(bboxes, "bboxes")
        if boxes_arr.ndim == 1:
            boxes_arr = boxes_arr[None]
        if boxes_arr.ndim != 2 or boxes_arr.shape[1] != 4 or len(boxes_arr) == 0:
            raise ValueError(
                f"bboxes must be [x1, y1, x2, y2] or a list of them, got shape {boxes_arr.shape}"
            )
        for i, box in enumerate(boxes_arr):
            check_box(box, f"box {i}", image_size)

    if points is not None:
        points_arr = _as_float_array(points, "points")
        if points_arr.ndim == 1:
            points_arr = points_arr[None, None]
        elif points_arr.ndim == 2:
            points_arr = points_arr[:, None]
        if points_arr.ndim != 3 or points_arr.shape[-1] != 2 or points_arr.size == 0:
            raise ValueError(
                "points must be [x, y], [[x, y], ...] or [[[x, y], ...]], "
                f"got shape {np.shape(points)}"
            )
        raw = None if labels is None else _as_float_array(labels, "labels")
        if raw is not None and raw.size != points_arr.shape[0] * points_arr.shape[1]:
            raise ValueError(
                f"labels ({raw.size}) do not match points "
                f"({points_arr.shape[0] * points_arr.shape[1]}): give one label per point"
            )
        per_object = None if raw is None else raw.reshape(points_arr.shape[:2])
        labels_arr = np.stack(
            [
                check_points(
                    obj,
                    None if per_object is None else per_object[i],
                    f"object {i}" if len(obj) > 1 else f"point {i}",
                    image_size,
                )[1]
                for i, obj in enumerate(points_arr)
            ]
        )
    elif labels is not None:
        raise ValueError("labels were given without points")

    if boxes_arr is not None and points_arr is not None:
        if len(boxes_arr) == 1 and len(points_arr) != 1:
            # One box with loose points: all of them describe that one object.
            points_arr = points_arr.reshape(1, -1, 2)
            labels_arr = labels_arr.reshape(1, -1)
        if len(points_arr) != len(boxes_arr):
            raise ValueError(
                f"{len(boxes_arr)} boxes and {len(points_arr)} point groups: give one box with "
                "its points, or one point group per box"
            )
    if boxes_arr is None and points_arr is None:
        raise ValueError("no prompt: give bboxes and/or points")
    return Prompts(
        boxes=None if boxes_arr is None else boxes_arr.astype(np.float32),
        points=None if points_arr is None else points_arr.astype(np.float32),
        labels=labels_arr,
    )
