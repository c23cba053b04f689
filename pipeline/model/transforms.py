"""SAM's geometry: resize the longest side to the model's input size, map prompts both ways.

The resize is PIL's bilinear filter, as the official SamPredictor does it: the model was
trained on that, and matching it exactly keeps masks identical to the reference.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) after scaling so the longer side equals `long_side` (rounded half up)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """HxWx3 uint8 -> hxwx3 uint8 with max(h, w) == long_side."""
    h, w = resized_shape(image.shape[0], image.shape[1], long_side)
    if (h, w) == image.shape[:2]:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def scale_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """...x2 (x, y) pixel coordinates in the original image -> the resized input frame."""
    h, w = original_size
    new_h, new_w = resized_shape(h, w, long_side)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / w
    out[..., 1] *= new_h / h
    return out.astype(np.float32)


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """Nx4 (x1, y1, x2, y2) boxes in the original image -> the resized input frame."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
    return scale_coords(boxes, original_size, long_side).reshape(-1, 4)
