"""What the mask decoder answers (``DecodedMasks``), its check, and exclusive masks: each pixel
two or more tracks' masks claim goes to one of them (``exclusive_masks``), so an instance-id
PNG and per-track RLE masks say the same thing.

Masks are ``RegionMask`` (``pipeline.wire.masks``): the window of the frame that holds an
object's pixels and the bool array inside it, so what an object costs follows its area.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.wire.masks import RegionMask, as_region_masks

# A frame's embedding, whatever the decoder takes (SAM's: `pipeline.infer.encoder.ImageEmbedding`).
# The tracker never looks inside: it hands the one it was given to its decoder, so it needs
# neither the inference layer nor torch.
Embedding = Any


@dataclass
class ContestedPixels:
    """What decides who gets a pixel that two or more rows' masks claim: every claiming
    row's full-resolution mask logit there. In one of two forms:

    windows: N float32 arrays, row i's logits over its mask's window (``masks[i].box``), as
        a decoder that works on windows has them; the pixels claimed twice lie where windows
        overlap, and are found there.
    index, logits: (P,) int64 flat (row-major) indices into the (H, W) frame of the pixels
        two or more rows' masks claim (ascending), and the (N, P) float32 logit of every row
        at them, as a decoder that works on whole frames has them; ``exclusive_masks``
        turns them into windows (a row's logits at the listed pixels, 0 elsewhere).
    """

    index: np.ndarray | None = None
    logits: np.ndarray | None = None
    windows: Sequence[np.ndarray] | None = None


@dataclass
class DecodedMasks:
    """One decoder call's answer, rows in the order of the prompts.

    masks: N RegionMask of the frame, each row's own mask (its logits above the threshold,
        whatever the other rows say), or an (N, H, W) bool array (the tracker cuts it into
        windows).
    scores: (N,) predicted IoU scores.
    low_res_logits: (N, h, w) float32 low-res mask logits (SAM: 256x256), fed back as mask
        prompt on the next frame.
    contested: None, or the logits that decide the pixels two or more rows of ``masks``
        claim: then the tracker publishes exclusive masks (``exclusive_masks``); None keeps
        them overlapping.
    """

    masks: Sequence[RegionMask] | np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    contested: ContestedPixels | None = None


def exclusive_masks(
    masks: Sequence[RegionMask] | np.ndarray, contested: ContestedPixels, priority: Sequence[int]
) -> list[RegionMask]:
    """Own masks -> masks in which no pixel belongs to two rows.

    masks: N RegionMask of one frame (or an (N, H, W) bool array), the rows' own masks;
        contested: the logits where two or more of them are True (either form).
    priority: N classes, 0 first; a negative class takes no pixels (its row comes back
        empty). A contested pixel goes to the row with the highest logit among the rows of
        the best class that claim it (ties: the earlier row); an uncontested pixel stays with
        the one row that claims it. So the union of the result is the union of the own masks
        of the rows that take pixels.
    Returns N RegionMask in the rows' windows; a row that loses nothing is its own mask
    itself (the same object, or for an array a view of it).
    """
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
        height, width = masks.shape[1:]
        regions: Sequence[RegionMask] = [
            RegionMask((height, width), (0, 0, width, height), mask.astype(bool, copy=False))
            for mask in masks
        ]
    else:
        regions = masks
    count = len(regions)
    if len(priority) != count:
        raise ValueError(f"priority needs one class per mask: {count} masks, {len(priority)}")
    classes = np.asarray(priority, dtype=np.int64)
    out = [
        region if classes[row] >= 0 else RegionMask.empty(region.frame_size)
        for row, region in enumerate(regions)
    ]
    if count == 0:
        return out
    windows = contested.windows
    if windows is None:
        if contested.index is None or contested.logits is None:
            raise ValueError("contested pixels need windows, or index and logits")
        windows = _windows_of(regions, contested.index, contested.logits)
    return _exclusive_in_windows(regions, windows, classes, out)


def _windows_of(
    regions: Sequence[RegionMask], index: np.ndarray, logits: np.ndarray
) -> list[np.ndarray]:
    """The pixel-listed form as logit windows: each row's logits at the contested pixels in
    its window, 0 elsewhere (a pixel only one row claims goes to it whatever its logit)."""
    ys, xs = np.divmod(index, regions[0].frame_size[1])
    windows = []
    for row, region in enumerate(regions):
        x1, y1, x2, y2 = region.box
        window = np.zeros(region.window.shape, np.float32)
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        window[ys[inside] - y1, xs[inside] - x1] = logits[row, inside]
        windows.append(window)
    return windows


def _exclusive_in_windows(
    regions: Sequence[RegionMask],
    windows: Sequence[np.ndarray],
    classes: np.ndarray,
    out: list[RegionMask],
) -> list[RegionMask]:
    """``exclusive_masks`` from every row's logits in its window.

    Rows go one by one over a canvas that keeps, per pixel, the best (class, logit) so far
    and its row: a row takes a pixel it claims when its class is better, or equal with a
    higher logit (so on a tie the earlier row keeps it). Only rows whose window overlaps
    another's can lose pixels, and only those are drawn, on the canvas of their union box.
    """
    if len(windows) != len(regions):
        raise ValueError(f"one logit window per mask: {len(regions)} masks, {len(windows)}")
    active = [
        row
        for row, region in enumerate(regions)
        if classes[row] >= 0 and region.width and region.height
    ]
    if len(active) < 2:
        return out
    boxes = np.array([regions[row].box for row in active], dtype=np.int64)
    overlap = (
        np.minimum(boxes[:, None, 2], boxes[None, :, 2])
        > np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    ) & (
        np.minimum(boxes[:, None, 3], boxes[None, :, 3])
        > np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    )
    np.fill_diagonal(overlap, False)
    rows = [row for row, hit in zip(active, overlap.any(axis=1), strict=True) if hit]
    if not rows:
        return out
    boxes = np.array([regions[row].box for row in rows], dtype=np.int64)
    ox, oy = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    shape = (int(boxes[:, 3].max()) - oy, int(boxes[:, 2].max()) - ox)
    best_class = np.full(shape, np.iinfo(np.int64).max, dtype=np.int64)
    best_logit = np.full(shape, -np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int64)
    places = {}
    for row in rows:
        region, logits = regions[row], windows[row]
        if logits.shape != region.window.shape:
            raise ValueError(
                f"row {row}: logits of {logits.shape} for a {region.window.shape} window"
            )
        x1, y1, x2, y2 = region.box
        place = (slice(y1 - oy, y2 - oy), slice(x1 - ox, x2 - ox))
        places[row] = place
        claimed, here = best_class[place], best_logit[place]
        cls = classes[row]
        takes = region.window & ((cls < claimed) | ((cls == claimed) & (logits > here)))
        claimed[takes] = cls
        here[takes] = logits[takes]
        owner[place][takes] = row
    for row in rows:
        region = regions[row]
        kept = region.window & (owner[places[row]] == row)
        if not np.array_equal(kept, region.window):
            out[row] = RegionMask(region.frame_size, region.box, kept)
    return out


class MaskDecoderFn(Protocol):
    """Decodes all tracks' prompts of one frame in one batch (on that frame's embedding)."""

    def __call__(
        self,
        image: Embedding | None,
        boxes: np.ndarray,
        mask_logits: list[np.ndarray | None],
        points: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ) -> DecodedMasks:
        """Decode N prompts.

        image: the frame's embedding, as ``PromptTracker.step`` was given it.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in original-frame pixels; a row is NaN for a
            points-only prompt.
        mask_logits: N entries, each the track's previous (h, w) low-res logits or None.
        points: None when no prompt has points, else N entries, each None or
            ``(coords (K, 2) float32 x/y pixels, labels (K,) int32 1=foreground 0=background)``.
        Returns each row's own mask; with ``contested`` set when masks are to be exclusive.
        """
        ...


def checked_decoded(decoded: DecodedMasks, count: int, frame_size: tuple[int, int]) -> DecodedMasks:
    """The decoder's answer for ``count`` rows of an (H, W) frame, with its masks as
    RegionMasks. The decoder is ours, so a bad answer is a bug: RuntimeError."""
    masks, scores = getattr(decoded, "masks", None), getattr(decoded, "scores", None)
    logits = getattr(decoded, "low_res_logits", None)
    contested = getattr(decoded, "contested", None)
    problems = []
    regions: tuple[RegionMask, ...] = ()
    if isinstance(masks, np.ndarray) and (
        masks.dtype != np.bool_ or masks.shape != (count, *frame_size)
    ):
        problems.append(f"masks must be bool {(count, *frame_size)}, got {_describe(masks)}")
    elif not isinstance(masks, (np.ndarray, Sequence)) or len(masks) != count:
        problems.append(f"masks must be {count} RegionMask, got {_describe(masks)}")
    else:
        try:
            regions = as_region_masks(masks, frame_size)
        except ValueError as err:
            problems.append(str(err))
    if (
        not isinstance(scores, np.ndarray)
        or scores.shape != (count,)
        or not np.all(np.isfinite(scores))
    ):
        problems.append(f"scores must be {count} finite numbers, got {_describe(scores)}")
    if not isinstance(logits, np.ndarray) or logits.ndim != 3 or logits.shape[0] != count:
        problems.append(f"low_res_logits must be ({count}, h, w), got {_describe(logits)}")
    if contested is not None:
        problems.extend(_contested_problems(contested, count, regions, frame_size))
    if problems:
        raise RuntimeError("mask decoder returned a malformed batch: " + "; ".join(problems))
    return dataclasses.replace(decoded, masks=regions)


def _contested_problems(
    contested: object, count: int, regions: tuple[RegionMask, ...], frame_size: tuple[int, int]
) -> list[str]:
    windows = getattr(contested, "windows", None)
    if windows is not None:
        shapes = [getattr(w, "shape", None) for w in windows]
        wanted = [m.window.shape for m in regions]
        if (
            len(shapes) != count
            or (regions and shapes != wanted)
            or not all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in windows)
        ):
            return [f"contested.windows must be float32 logits of the {count} mask windows"]
        return []
    index = getattr(contested, "index", None)
    logits = getattr(contested, "logits", None)
    pixels = frame_size[0] * frame_size[1]
    if (
        not isinstance(index, np.ndarray)
        or index.ndim != 1
        or index.dtype.kind not in "iu"
        or (index.size > 0 and (int(index.min()) < 0 or int(index.max()) >= pixels))
    ):
        return [f"contested.index must be flat pixel indices < {pixels}, got {_describe(index)}"]
    if not isinstance(logits, np.ndarray) or logits.shape != (count, index.size):
        return [f"contested.logits must be ({count}, {index.size}), got {_describe(logits)}"]
    return []


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
