"""Masks, boxes and ids drawn over an image, for people to look at (overlay PNG and video).

One renderer for `samstream predict`'s overlay.png and a run's overlay.mp4, so both look the
same. Each id's colour is its colour in the instance-id PNG palette (PASCAL VOC, as DAVIS
uses), so an object has one colour in every output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.wire.masks import RegionMask, as_region_masks

OVERLAY_ALPHA = 0.5  # mask opacity
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map that DAVIS uses: 0 black, then 255 distinct colours.

    Each index's bits are spread over the high bits of R, G and B, so neighbouring ids get
    very different colours and the mapping is one-to-one.
    """
    palette: list[int] = []
    for index in range(256):
        red = green = blue = 0
        bits = index
        for shift in range(7, -1, -1):
            red |= (bits & 1) << shift
            green |= ((bits >> 1) & 1) << shift
            blue |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette += [red, green, blue]
    return palette


PALETTE: list[int] = _voc_palette()
"""256 RGB colours as a flat list of 768 ints, for ``PIL.Image.putpalette``."""


def track_color(track_id: int) -> tuple[int, int, int]:
    """The RGB colour of an id: its PNG palette entry (ids above 255 wrap, never to black)."""
    index = (int(track_id) - 1) % 255 + 1
    red, green, blue = PALETTE[3 * index : 3 * index + 3]
    return red, green, blue


def _label(canvas: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    """Text in the id's colour on a dark box, readable on any background (a dark id colour
    on a dark frame, or a light one on snow, would otherwise vanish)."""
    scale, thickness = 0.5, 1
    (width, height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    frame_h, frame_w = canvas.shape[:2]
    x = min(max(x, 0), max(frame_w - width - 4, 0))
    y = min(max(y, height + 4), frame_h - baseline - 1)
    cv2.rectangle(canvas, (x, y - height - 3), (x + width + 3, y + baseline), (0, 0, 0), -1)
    # Light text for dark colours: the id's colour itself is kept for the box and the tint.
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = color if luma >= 96 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 2, y), _FONT, scale, text_color, thickness, cv2.LINE_AA)


@functools.lru_cache(maxsize=1024)
def _tint_table(color: tuple[int, int, int], alpha: float) -> np.ndarray:
    """(1, 256, 3) uint8: for each channel value, the value blended with ``color``.

    A pixel's tint depends only on its value, per channel: the table holds the arithmetic
    of blending each of the 256 values (float32 times ``1 - alpha`` plus the colour times
    ``alpha``, truncated), so looking a pixel up gives the blend's very result.
    """
    values = np.arange(256, dtype=np.float32)[:, None]
    table = (values * (1 - alpha) + np.array(color) * alpha).astype(np.uint8)
    table = np.ascontiguousarray(table[None])
    table.flags.writeable = False  # shared by every call with this colour
    return table


def draw_overlay(
    image: np.ndarray,
    masks: np.ndarray | Sequence[RegionMask],
    ids: Sequence[int],
    boxes: Sequence[Sequence[float] | None] | None = None,
    *,
    labels: Sequence[str | None] | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """A new HxWx3 uint8 RGB image: ``image`` with each mask (NxHxW bool, or N RegionMask)
    blended in its id's colour and outlined; each box (``x1, y1, x2, y2``, exclusive ends;
    None: no box) drawn with its label (default: the id; None: no label).

    Each mask is drawn inside its window only (the pixels outside are not its), so the cost
    follows the objects' areas; the pixels are those of drawing it over the whole frame.
    """
    out = image.copy()
    regions = as_region_masks(masks, (image.shape[0], image.shape[1]))
    for region, track_id in zip(regions, ids, strict=True):
        window = region.window
        if not window.any():
            continue
        color = track_color(track_id)
        canvas = out[region.slices]  # a view: drawing into it draws into the frame
        inside = window.view(np.uint8)
        # The tint where the mask is, written into the frame through the view: OpenCV
        # writes an output of the right size and type in place (else, copy it there).
        tinted = cv2.copyTo(cv2.LUT(canvas, _tint_table(color, alpha)), inside, canvas)
        if not np.may_share_memory(tinted, canvas):
            canvas[...] = tinted
        # findContours pads its input with a zero border, as the frame outside the window
        # is: the contours of the window, moved by its offset, are the frame's.
        contours, _ = cv2.findContours(
            inside,
            cv2.RETR_EXTERNAL,
            cv2.CHAIN_APPROX_SIMPLE,
            offset=(region.box[0], region.box[1]),
        )
        cv2.drawContours(out, contours, -1, color, 1)
    for i, track_id in enumerate(ids):
        box = None if boxes is None else boxes[i]
        if box is None:
            continue
        color = track_color(track_id)
        x1, y1, x2, y2 = (round(v) for v in box)
        cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), color, 2)
        label = str(track_id) if labels is None else labels[i]
        if label:
            _label(out, label, x1, y1 - 4, color)
    return out
