"""SAM's mask upscaling, computed near each object instead of over the whole frame.

``MobileSAM.upscale_masks`` turns (g, g) low-res logits (256 x 256 at a 1024 input) into
logits at the frame's size in two bilinear resizes (``align_corners=False``): to the padded
input (S, S) = (4g, 4g), a crop to the resized image (h, w), then to the frame (H, W). An
object's positive pixels lie in a small part of the frame; ``Upscaler`` finds that part and
gives the logits there, the same float32 values as the whole-frame resize:

- ``windows``: the window outside which no pixel can be positive. Bilinear weights are >= 0,
  so a pixel whose inputs are all <= 0 (SAM's threshold) stays <= 0 with any rounding: only
  pixels that read, through both resizes, a low-res logit above the threshold can be
  positive. Each output index reads input indices ``i0 = floor(src)`` and ``i0 + 1`` with
  ``src = scale * (d + 0.5) - 0.5`` (``scale = n_in / n_out``); the window is the box of the
  low-res positives grown by what the two resizes reach, in frame pixels (one low-res pixel
  plus one index of slack per resize for the kernel's rounding of ``src``).
- ``window_logits``: the logits in a window, computed by PyTorch's own resize kernel on
  inputs cut so that every output pixel of the window sees the operands, indices and weights
  it sees in the full-frame resize:

  * the first resize has ``scale = 1/4`` exactly, so ``src`` is exact and a low-res crop
    (with a margin for the kernel's clamps at its edges) resizes to exactly the same values
    as the full map does there;
  * the second resize's scale is inexact, so its source index of output ``d`` can only be
    computed from ``d`` itself: each axis is resized from index 0 up to the window's end,
    with the window's input rows / columns in place (zeros before them, which reach only
    outputs before the window), and the kernel is given the full-frame resize's scale
    (``scales_h`` / ``scales_w``), so ``src``, ``i0`` and the weights are the full-frame
    ones. The bilinear kernel interpolates along the width and then along the height of
    what that gave (``out = lerp_h(lerp_w(row i0), lerp_w(row i1))``): the width pass is
    one resize with the height unchanged, the height pass one with the width unchanged, and
    a resize along an unchanged axis is the identity (weights 1 and 0).

  The kernel computes every output element alike except in two shortcuts, which the cut
  resizes are kept out of: an output no longer than its input along an axis is a copy
  there (one more input or output row / column avoids the equality), and outputs with
  height + width <= 128 go through another, separable algorithm with other roundings (extra
  zero rows / columns, or a larger low-res crop, keep every output above that; frames so
  small are upscaled whole). The work per object follows its window's height times its
  right edge plus its width times its bottom edge, not the frame's area. That a machine's
  kernel keeps to all this is checked once per geometry by ``matches_full_frame``; the
  tracker falls back to the full-frame resize where it does not.

Arrays: low-res logits (g, g) float32; boxes ``(x1, y1, x2, y2)`` in frame pixels with
exclusive ``x2``/``y2``; windows (y2 - y1, x2 - x1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.wire.masks import WindowBox

EMPTY_BOX: WindowBox = (0, 0, 0, 0)
_FIRST_FACTOR = 4  # the mask decoder's low-res logits are the padded input / 4 on a side
# PyTorch's CPU kernel resizes outputs with height + width <= 128 by another (separable)
# algorithm, whose roundings differ: every resize here has a larger output, as the
# full-frame resizes of a frame above that size do.
_GENERIC = 129


def _source_index(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64 ``i0`` of each output index, as the kernel computes it (float32), up
    to one index where the kernel's rounding of ``src`` differs from this one's."""
    d = np.arange(n_out)
    if n_in == n_out:
        return d
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (d.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    return np.minimum(np.floor(src).astype(np.int64), n_in - 1)


def _kernel_scale(n_in: int, n_out: int) -> float:
    """A scale factor (float64, output / input) from which the kernel derives the same
    float32 ``n_in / n_out`` as from the sizes (it takes ``float32(1.0 / scale)``)."""
    target = np.float32(n_in) / np.float32(n_out)
    guess = 1.0 / float(target)
    for _ in range(4):
        if np.float32(1.0 / guess) == target:
            return guess
        guess = float(np.nextafter(guess, np.inf if np.float32(1.0 / guess) > target else 0))
    raise RuntimeError(f"no scale factor reproduces the resize {n_in} -> {n_out}")


def _resize(x: torch.Tensor, size: tuple[int, int], scales: tuple[float | None, float | None]):
    """(h, w) -> ``size`` bilinear, ``align_corners=False``, with the kernel's scales given."""
    out = torch.ops.aten.upsample_bilinear2d.default(x[None, None], list(size), False, *scales)
    return out[0, 0]


class Upscaler:
    """``MobileSAM.upscale_masks`` for one geometry, one window at a time.

    low_size: g; padded_size: S (must be 4g, as SAM's decoder makes it); input_size: (h, w) of
    the resized image in the padded input; original_size: (H, W) of the frame.
    """

    def __init__(
        self,
        *,
        low_size: int,
        padded_size: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> None:
        if padded_size != _FIRST_FACTOR * low_size:
            raise ValueError(
                f"low-res logits of {low_size} do not fit a {padded_size} input: the window "
                f"resize needs the input to be {_FIRST_FACTOR}x the low-res side"
            )
        h, w = (int(v) for v in input_size)
        height, width = (int(v) for v in original_size)
        if not (0 < h <= padded_size and 0 < w <= padded_size) or height <= 0 or width <= 0:
            raise ValueError(
                f"input_size {input_size} / original_size {original_size} do not fit a "
                f"{padded_size} input"
            )
        if 2 * padded_size < _GENERIC or height + width < _GENERIC:
            raise ValueError(
                f"a {width}x{height} frame at a {padded_size} input is resized by another "
                "algorithm of the kernel than windows are: use the full-frame resize"
            )
        self.low_size = int(low_size)
        self.input_size = (h, w)
        self.original_size = (height, width)
        # Second resize: the source row / column of each frame row / column (+-1, see
        # _source_index), and the scales that make the kernel use the full-frame ones.
        self._row_src = _source_index(h, height)
        self._col_src = _source_index(w, width)
        self._scale_h = _kernel_scale(h, height)
        self._scale_w = _kernel_scale(w, width)
        # Per frame row / column, the lowest and highest low-res index it can read: the
        # second resize's i0 - 1 .. i0 + 2 (rounding slack and i1 = i0 + 1), then the first
        # resize's i0 / i1 of those (exact: its scale is 1/4). Both grow with the index.
        first = _source_index(self.low_size, padded_size)
        first_next = np.minimum(first + 1, self.low_size - 1)
        self._row_low = first[np.maximum(self._row_src - 1, 0)]
        self._row_high = first_next[np.minimum(self._row_src + 2, h - 1)]
        self._col_low = first[np.maximum(self._col_src - 1, 0)]
        self._col_high = first_next[np.minimum(self._col_src + 2, w - 1)]

    # ------------------------------------------------------------------ windows

    def windows(self, low: np.ndarray, threshold: float = 0.0) -> list[WindowBox]:
        """Per row of (N, g, g) low-res logits, the frame window outside which every pixel's
        upscaled logit is <= ``threshold``; (0, 0, 0, 0) when no pixel can exceed it.

        Exact for SAM's threshold 0 (module docs); another threshold is lowered by a relative
        1e-5 first, more than the rounding of weights that sum to 1 can add.
        """
        low = np.asarray(low)
        if low.ndim != 3 or low.shape[1:] != (self.low_size, self.low_size):
            raise ValueError(
                f"low-res logits must be (N, {self.low_size}, {self.low_size}), got {low.shape}"
            )
        positive = low > threshold - abs(threshold) * 1e-5
        boxes: list[WindowBox] = []
        for row_hit, col_hit in zip(positive.any(axis=2), positive.any(axis=1), strict=True):
            rows = np.flatnonzero(row_hit)
            if rows.size == 0:
                boxes.append(EMPTY_BOX)
                continue
            cols = np.flatnonzero(col_hit)
            y1, y2 = _span(self._row_low, self._row_high, int(rows[0]), int(rows[-1]))
            x1, x2 = _span(self._col_low, self._col_high, int(cols[0]), int(cols[-1]))
            boxes.append((x1, y1, x2, y2) if x2 > x1 and y2 > y1 else EMPTY_BOX)
        return boxes

    # ------------------------------------------------------------------ logits

    def window_logits(self, low: torch.Tensor, box: WindowBox) -> torch.Tensor:
        """(y2 - y1, x2 - x1) float32 logits of frame window ``box`` from one (g, g) float32
        low-res map, on its device: the values ``upscale_masks`` gives there."""
        x1, y1, x2, y2 = box
        height, width = self.original_size
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise ValueError(f"window {box} does not lie in the {width}x{height} frame")
        if x2 == x1 or y2 == y1:
            return low.new_zeros((y2 - y1, x2 - x1))
        h, w = self.input_size
        # Rows / columns of the cropped first resize that the window reads: i0 - 1 .. i0 + 2,
        # and up to i0 + 3 where the kernel's clamp i1 = i0 + (i0 < n - 1) must see the
        # input's true end (a shorter input would end the interpolation early).
        ua, ub = max(int(self._row_src[y1]) - 1, 0), min(int(self._row_src[y2 - 1]) + 3, h)
        va, vb = max(int(self._col_src[x1]) - 1, 0), min(int(self._col_src[x2 - 1]) + 3, w)
        # A resize whose output is as long as its input is a copy for the kernel, whatever
        # the scale: where the cut sizes happen to be equal, one more input (or, at the
        # input's end, one more output) keeps it a resize, as it is on the whole frame.
        out_h, out_w = y2, x2
        if vb == out_w and w != width:
            vb, out_w = (vb + 1, out_w) if vb < w else (vb, out_w + 1)
        if ub == out_h and h != height:
            ub, out_h = (ub + 1, out_h) if ub < h else (ub, out_h + 1)
        first = self._first_resize(low, ua, ub, va, vb)
        # Width pass: columns 0..out_w of the frame, from rows ua..ub of the first resize
        # with its columns va..vb in place (the zeros before them reach only columns < x1).
        # Extra zero rows keep the output above the kernel's small-output size (_GENERIC).
        rows = max(ub - ua, _GENERIC - out_w)
        wide = first.new_zeros((rows, vb))
        wide[: ub - ua, va:] = first
        along_width = _resize(wide, (rows, out_w), (None, self._scale_w))[: ub - ua, x1:x2]
        # Height pass: rows 0..out_h, from those rows in place (zeros above reach rows < y1).
        cols = max(x2 - x1, _GENERIC - out_h)
        tall = along_width.new_zeros((ub, cols))
        tall[ua:, : x2 - x1] = along_width
        return _resize(tall, (out_h, cols), (self._scale_h, None))[y1:y2, : x2 - x1]

    def _first_resize(self, low: torch.Tensor, ua: int, ub: int, va: int, vb: int):
        """Rows ua..ub, columns va..vb of the first resize (low-res -> padded input)."""
        g, factor = self.low_size, _FIRST_FACTOR
        r0, r1 = _first_crop(ua, ub, g)
        c0, c1 = _first_crop(va, vb, g)
        # A larger crop than needed where the output would be small (_GENERIC): its extra
        # rows / columns are exact too, and only cut away.
        short = -(-_GENERIC // factor) - (r1 - r0) - (c1 - c0)
        if short > 0:
            r0, r1 = _grow(r0, r1, short, g)
            short = -(-_GENERIC // factor) - (r1 - r0) - (c1 - c0)
            if short > 0:
                c0, c1 = _grow(c0, c1, short, g)
        crop = low[r0:r1, c0:c1]
        size = (factor * crop.shape[0], factor * crop.shape[1])
        up = F.interpolate(crop[None, None], size, mode="bilinear", align_corners=False)[0, 0]
        return up[ua - factor * r0 : ub - factor * r0, va - factor * c0 : vb - factor * c0]


def _span(low: np.ndarray, high: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """[start, stop) of the output indices whose read range [low, high] meets [first, last]."""
    start = int(np.searchsorted(high, first, side="left"))
    stop = int(np.searchsorted(low, last, side="right"))
    return start, max(start, stop)


def _grow(start: int, stop: int, extra: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown by ``extra`` indices within [0, limit), at the end first."""
    stop_grown = min(stop + extra, limit)
    return max(start - (extra - (stop_grown - stop)), 0), stop_grown


def _first_crop(start: int, stop: int, low_size: int) -> tuple[int, int]:
    """Low-res index range whose 4x resize holds outputs start..stop exactly as the full
    map's resize: the kernel clamps ``src`` at 0 and ``i1`` at the input's end, so an output
    of the crop is the full map's only two outputs in from a cut edge (``src = u/4 - 3/8``:
    output ``4 r0 + 2`` is the first to read only rows >= r0, ``4 r1 - 3`` the last whose
    ``i1`` is inside ``r1``)."""
    r0 = max((start - 2) // _FIRST_FACTOR, 0)
    r1 = min(-(-(stop + 2) // _FIRST_FACTOR), low_size)
    return r0, r1


def matches_full_frame(
    upscaler: Upscaler,
    full_frame: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    boxes: Sequence[WindowBox],
) -> bool:
    """True when ``window_logits`` gives, on ``device``, exactly the values of ``full_frame``
    ((g, g) low-res -> (H, W) logits: the model's own upscaling) in each of ``boxes``, on
    random logits. A one-off check per geometry: it costs one full-frame resize."""
    generator = torch.Generator().manual_seed(0)
    g = upscaler.low_size
    low = (16 * torch.randn((g, g), generator=generator)).to(device)
    with torch.inference_mode():
        full = full_frame(low)
        for x1, y1, x2, y2 in boxes:
            window = upscaler.window_logits(low, (x1, y1, x2, y2))
            if not torch.equal(window, full[y1:y2, x1:x2]):
                return False
    return True
