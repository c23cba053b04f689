"""Masks, boxes and ids drawn over an image, for people to look at (overlay PNG and video)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per id (golden-ratio hue steps)."""
    hue = int((track_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def draw_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    ids: Sequence[int],
    boxes: Sequence[Sequence[float] | None] | None = None,
    *,
    alpha: float = 0.5,
) -> np.ndarray:
    """HxWx3 uint8 RGB + NxHxW bool masks -> a new HxWx3 uint8 RGB with masks blended in,
    each outlined, with its box (where not None) and id. `ids` picks each mask's colour."""
    out = image.copy()
    for i, track_id in enumerate(ids):
        color = track_color(track_id)
        mask = masks[i]
        if mask.any():
            tinted = out[mask].astype(np.float32) * (1 - alpha) + np.array(color) * alpha
            out[mask] = tinted.astype(np.uint8)
            contours, _ = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            cv2.drawContours(out, contours, -1, color, 2)
        if boxes is not None and boxes[i] is not None:
            x1, y1, x2, y2 = (round(v) for v in boxes[i])
            cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
            cv2.putText(
                out, str(track_id), (x1 + 3, max(y1 - 5, 12)),
                cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 2, cv2.LINE_AA,
            )
    return out
