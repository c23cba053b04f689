"""One object's mask kept as the window that holds it, not as a whole frame.

An object covers a small part of the frame, and every stage after the mask decoder (the
tracker's measurement and exclusivity, the wire, the PNG, the RLE, the overlay) needs only
the pixels near it: a ``RegionMask`` is the frame-sized bool mask stored as a box plus the
bool array inside the box, so the work per object follows its area, not the frame's.

Coordinates are pixels of the frame, ``(x1, y1, x2, y2)`` with exclusive ``x2``/``y2``, as
everywhere in the pipeline; sizes are ``(height, width)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WindowBox = tuple[int, int, int, int]
"""``(x1, y1, x2, y2)`` integer pixel bounds in a frame, exclusive ``x2``/``y2``."""

_EMPTY_BOX: WindowBox = (0, 0, 0, 0)


def is_int(value: object) -> bool:
    """An integer of Python's or numpy's, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def frame_size_of(size: Sequence[Any]) -> tuple[int, int]:
    """``size`` as ``(H, W)`` plain ints; ValueError unless it is two positive integers."""
    if len(size) != 2 or not all(is_int(v) and v > 0 for v in size):
        raise ValueError(f"frame_size must be (H, W) positive integers, got {size!r}")
    return int(size[0]), int(size[1])


@dataclass(frozen=True, eq=False)
class RegionMask:
    """An (H, W) bool mask that is False outside ``box``.

    frame_size: (H, W) of the frame the mask belongs to.
    box: ``(x1, y1, x2, y2)`` ints with ``0 <= x1 <= x2 <= W`` and ``0 <= y1 <= y2 <= H``;
        an empty box (zero width or height) holds no pixel.
    window: (y2 - y1, x2 - x1) bool, the mask inside the box (row-major, like the frame).

    The box bounds the True pixels but need not be tight (a window may have False rows or
    columns at its edges); ``tight()`` gives the smallest one. ``dense()`` (or
    ``numpy.asarray``) builds the full (H, W) array, costing a frame's worth of memory.
    Instances are not meant to be mutated: ``window`` may be shared with other objects.
    """

    frame_size: tuple[int, int]
    box: WindowBox
    window: np.ndarray

    def __post_init__(self) -> None:
        box, window = self.box, self.window
        height, width = frame_size_of(self.frame_size)
        if len(box) != 4 or not all(is_int(v) for v in box):
            raise ValueError(f"box must be 4 integers (x1, y1, x2, y2), got {box!r}")
        x1, y1, x2, y2 = (int(v) for v in box)
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise ValueError(
                f"box {box!r} does not lie in the {width}x{height} frame "
                "(needs 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H)"
            )
        shape = (y2 - y1, x2 - x1)
        if not isinstance(window, np.ndarray) or window.dtype != np.bool_ or window.shape != shape:
            got = type(window).__name__
            if isinstance(window, np.ndarray):
                got = f"{window.dtype} {window.shape}"
            raise ValueError(f"window must be a {shape} bool array for box {box!r}, got {got}")
        # Plain ints: boxes go into JSON headers, and numpy ints would not compare as tuples.
        object.__setattr__(self, "frame_size", (height, width))
        object.__setattr__(self, "box", (x1, y1, x2, y2))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def empty(cls, frame_size: tuple[int, int]) -> RegionMask:
        """The mask without any pixel."""
        return cls(frame_size, _EMPTY_BOX, np.zeros((0, 0), dtype=bool))

    @classmethod
    def from_dense(cls, mask: np.ndarray) -> RegionMask:
        """The tight window of an (H, W) bool mask (nonzero = inside, for integer masks)."""
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"mask must be a non-empty (H, W) array, got shape {mask.shape}")
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.integer):
                raise ValueError(f"mask must be bool or integer, got {mask.dtype}")
            mask = mask != 0
        height, width = mask.shape
        return cls((height, width), (0, 0, width, height), mask).tight()

    # ------------------------------------------------------------------ views

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` of the window in an (H, W) frame array."""
        x1, y1, x2, y2 = self.box
        return slice(y1, y2), slice(x1, x2)

    def any(self) -> bool:
        """True when the mask has a pixel."""
        return bool(self.window.any())

    def area(self) -> int:
        """Number of True pixels."""
        return int(np.count_nonzero(self.window))

    def tight(self) -> RegionMask:
        """The same mask in the smallest window (an empty box when it has no pixel)."""
        box = tight_box(self.window)
        if box is None:
            return RegionMask.empty(self.frame_size)
        x1, y1, x2, y2 = box
        if (x1, y1, x2, y2) == (0, 0, self.width, self.height):
            return self
        ox, oy = self.box[0], self.box[1]
        return RegionMask(
            self.frame_size, (x1 + ox, y1 + oy, x2 + ox, y2 + oy), self.window[y1:y2, x1:x2]
        )

    def dense(self) -> np.ndarray:
        """A new (H, W) bool array of the whole frame."""
        out = np.zeros(self.frame_size, dtype=bool)
        out[self.slices] = self.window
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        dense = self.dense()
        return dense if dtype is None else dense.astype(dtype)

    def __repr__(self) -> str:
        return f"RegionMask(frame_size={self.frame_size}, box={self.box}, area={self.area()})"


def tight_box(mask: np.ndarray) -> WindowBox | None:
    """``(x1, y1, x2, y2)`` around the True pixels of a 2-D bool array; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def as_region_masks(
    masks: np.ndarray | Sequence[RegionMask], frame_size: tuple[int, int]
) -> tuple[RegionMask, ...]:
    """Masks as RegionMasks of ``frame_size``: an (N, H, W) bool (or integer) array is cut
    into tight windows; a sequence of RegionMask is checked. Raises ValueError."""
    size = frame_size_of(frame_size)
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3 or (masks.shape[0] and masks.shape[1:] != size):
            raise ValueError(
                f"masks must be (N, H, W) with the frame's (H, W): the frame is {size}, the "
                f"masks' shape {masks.shape}"
            )
        return tuple(RegionMask.from_dense(mask) for mask in masks)
    regions = tuple(masks)
    for i, region in enumerate(regions):
        if not isinstance(region, RegionMask):
            raise ValueError(
                f"masks[{i}] must be a RegionMask (or pass an (N, H, W) array), got "
                f"{type(region).__name__}"
            )
        if region.frame_size != size:
            raise ValueError(
                f"masks[{i}] belongs to a {region.frame_size} frame, not {size} (height, width)"
            )
    return regions


def stack_dense(masks: Sequence[RegionMask], frame_size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool of N region masks (N may be 0)."""
    out = np.zeros((len(masks), *frame_size), dtype=bool)
    for i, region in enumerate(masks):
        out[i][region.slices] = region.window
    return out
