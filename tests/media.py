"""Synthetic media for tests, encoded with PyAV (nothing is downloaded).

`make_clip` writes a small clip of a bright rectangle moving at constant velocity over a dark,
textured, static background: easy enough for a tracker to follow, textured enough that an
encoder has real work to do. `clip_box` gives the rectangle's ground-truth box for any frame,
so tracker tests can compare against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BOX_COLOUR = (250, 230, 40)  # bright yellow: far from the dark background in every channel


def clip_box(
    index: int, *, frames: int, size: tuple[int, int], moving_box: bool = True
) -> tuple[int, int, int, int]:
    """Box ``(x1, y1, x2, y2)`` (x2/y2 exclusive) of the rectangle in frame ``index``.

    The rectangle is a fifth of the width and a quarter of the height, and travels on a
    straight line from the upper left to the lower right part of the frame over ``frames``
    frames (positions rounded to whole pixels). With ``moving_box=False`` it stays where it
    starts.
    """
    width, height = size
    box_w, box_h = max(2, width // 5), max(2, height // 4)
    x0, y0 = width // 10, height // 5
    x_end, y_end = width - width // 10 - box_w, height - height // 5 - box_h
    t = index / (frames - 1) if moving_box and frames > 1 else 0.0
    x1 = round(x0 + t * (x_end - x0))
    y1 = round(y0 + t * (y_end - y0))
    return x1, y1, x1 + box_w, y1 + box_h


def clip_frame(
    index: int, *, frames: int, size: tuple[int, int], moving_box: bool = True
) -> np.ndarray:
    """Frame ``index`` of the synthetic clip as an HxWx3 uint8 RGB array."""
    width, height = size
    # A fixed seed keeps the background identical in every frame and every run.
    background = np.random.default_rng(1234).integers(10, 60, size=(height, width, 3))
    image = background.astype(np.uint8)
    x1, y1, x2, y2 = clip_box(index, frames=frames, size=size, moving_box=moving_box)
    image[y1:y2, x1:x2] = BOX_COLOUR
    return image


def make_clip(
    path: Path | str,
    *,
    frames: int = 30,
    size: tuple[int, int] = (160, 120),
    fps: int | Fraction = 25,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    moving_box: bool = True,
    keyframe_interval: int | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
) -> Path:
    """Encode the synthetic clip to ``path`` (container chosen from the suffix) and return it.

    ``size`` is ``(width, height)``. ``keyframe_interval`` sets the encoder's GOP size (None:
    the encoder's default, 250 for libx264, i.e. one keyframe in a short clip); 1 makes every
    frame independently decodable, which tests of packet loss need for exact counts.

    By default frame ``i`` has pts ``i`` in a time base of ``1/fps``. Pass ``pts`` (one per
    frame, strictly increasing) and ``time_base`` to make a variable-frame-rate clip; the
    container may store them in a finer time base of its own.
    """
    path = Path(path)
    if pts is not None and len(pts) != frames:
        raise ValueError(f"pts has {len(pts)} values for {frames} frames")
    time_base = time_base if time_base is not None else 1 / Fraction(fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = time_base
        if keyframe_interval is not None:
            stream.codec_context.gop_size = keyframe_interval
        for i in range(frames):
            rgb = clip_frame(i, frames=frames, size=size, moving_box=moving_box)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = pts[i] if pts is not None else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
