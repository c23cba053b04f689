"""Mask helpers for the tests."""

from __future__ import annotations

import numpy as np

from pipeline.wire.masks import RegionMask, tight_box


def mask_box(mask: np.ndarray | RegionMask) -> tuple[float, float, float, float] | None:
    """``(x1, y1, x2, y2)`` around the True pixels of an (H, W) mask (a bool array or a
    RegionMask), x2/y2 exclusive, in frame pixels; None when it is empty."""
    dense = np.asarray(mask).astype(bool, copy=False)
    if dense.ndim != 2:
        raise ValueError(f"mask must have 2 dimensions, got shape {dense.shape}")
    box = tight_box(dense)
    return None if box is None else tuple(float(v) for v in box)
