"""Masks, boxes and ids drawn over an image, for people to look at (overlay PNG and video).

One renderer for `samstream predict`'s overlay.png and a run's overlay.mp4, so both look the
same. Each id's colour is its colour in the instance-id PNG palette (PASCAL VOC, as DAVIS
uses), so an object has one colour in every output.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

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


def draw_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    ids: Sequence[int],
    boxes: Sequence[Sequence[float] | None] | None = None,
    *,
    labels: Sequence[str | None] | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """A new HxWx3 uint8 RGB image: ``image`` with each of the NxHxW bool ``masks`` blended in
    its id's colour and outlined; each box (``x1, y1, x2, y2``, exclusive ends; None: no box)
    drawn with its label (default: the id; None: no label)."""
    out = image.copy()
    for i, track_id in enumerate(ids):
        mask = masks[i]
        if not mask.any():
            continue
        color = track_color(track_id)
        tinted = out[mask].astype(np.float32) * (1 - alpha) + np.array(color) * alpha
        out[mask] = tinted.astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
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
