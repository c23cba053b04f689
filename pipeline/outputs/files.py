"""The file outputs of a run (id PNGs, COCO-RLE JSON lines, MOT boxes, overlay video): their
names and formats, and the mask encodings they use, public for readers of the files.

One sink per format writes them (`pipeline.outputs.sinks`), driven by
`pipeline.outputs.writer.MaskWriter`. Every file is written under a temporary name in the
destination directory and moved into place once complete (`pipeline.outputs.atomic`), so a
crash never leaves a half-written file under a final name. Per-frame PNGs are moved into
place one by one as each frame is written; the three whole-run files when the writer
is committed.

Layout under ``out_dir``:

- ``masks/NNNNNN.png``: one PNG per frame, 6-digit 0-based frame index; the pixel value is
  the track id, 0 is background. While every id in the frame is at most 255 it is an 8-bit
  palette PNG (mode "P", the DAVIS convention, read by its tools); a frame with a track id
  above 255 (ids go up to ``messages.MAX_TRACK_ID``, 65535) is a 16-bit grayscale PNG
  instead, with the ids as they are. ``read_id_mask`` (or ``cv2.imread(path,
  cv2.IMREAD_UNCHANGED)``, or ``numpy.asarray(PIL.Image.open(path))``) gives the ids of
  either kind; a reader that takes only palette PNGs keeps working for runs of up to 255
  objects.
- ``masks.jsonl``: one JSON object per frame::

      {"frame": 12, "seq": 12, "pts": 6144, "time": 0.48,
       "tracks": [{"id": 1, "box": [x1, y1, x2, y2], "score": 0.93, "state": "tracked",
                   "rle": {"size": [h, w], "counts": "..."}}]}

  ``time`` is ``pts * time_base`` in seconds (null without pts); ``pts`` increases strictly
  from frame to frame: where the decoder had to repair the file's timestamps (B-frames stored
  with pts == dts, missing pts, a concatenation), it is the repaired value and the file's own
  is kept as ``source_pts`` (present only on those frames). ``rle`` is COCO compressed RLE
  (``pycocotools.mask.decode`` reads it after ``counts.encode()``).
- ``tracks.txt``: MOT Challenge lines ``frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1``
  (frame 1-based), for tracks that are tentative, tracked or coasting; lost tracks are left out.
- ``overlay.mp4``: H.264 (libx264, yuv420p) of the input with translucent masks, boxes and ids,
  one output frame per input frame at the input's timestamps, at the first frame's size
  (frames of another size, after a mid-stream resolution change, are scaled to it).
  yuv420p needs even sizes: an odd width or height is padded by one pixel on the right or
  bottom, repeating the edge pixels.

Frame sizes are ``(height, width)`` throughout, like numpy shapes and COCO's RLE ``size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.wire.masks import RegionMask, as_region_masks
from pipeline.wire.messages import MAX_TRACK_ID

# The names under ``out_dir``.
MASKS_DIR, JSONL, MOT, OVERLAY = "masks", "masks.jsonl", "tracks.txt", "overlay.mp4"

# The largest id an 8-bit palette PNG holds; a frame with a larger one is written in 16 bits.
MAX_8BIT_ID = 255


def encode_rle(mask: np.ndarray | RegionMask) -> dict:
    """COCO compressed RLE of an HxW mask: ``{"size": [h, w], "counts": str}``.

    Nonzero pixels are inside (a float mask is refused: which threshold is right is the
    caller's call). The counts are the column-major (Fortran order) runs that COCO tools
    expect, as an ASCII string so the result is JSON-ready. They are made from the mask's
    window (the runs of the rest of the frame are known: all zeros), with the same bytes as
    encoding the full frame.
    """
    region = mask if isinstance(mask, RegionMask) else RegionMask.from_dense(mask)
    height, width = region.frame_size
    counts = _window_runs(region)
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def _window_runs(region: RegionMask) -> np.ndarray:
    """The uncompressed COCO counts of a RegionMask's full frame, from its window.

    COCO runs go down the columns of the (H, W) frame (pixel (x, y) is number x * H + y)
    and alternate 0s, 1s, 0s, ..., starting with a (possibly empty) run of 0s; the last run
    ends the frame. Runs of 1s lie in the window's columns; between two of its columns the
    frame has the H - h rows outside the window, all 0s.
    """
    height, width = region.frame_size
    x1, y1, x2, y2 = region.box
    rows, cols = y2 - y1, x2 - x1
    gap = 1 if rows < height else 0  # one 0 stands for the rows outside the window
    column = rows + gap
    # The window's columns one after another, each followed by its stand-in 0, between a 0
    # before and a 0 after: value changes alternate, a run of 1s starting, then ending.
    sequence = np.zeros(cols * column + 2, dtype=np.int8)
    sequence[1:-1].reshape(cols, column)[:, :rows] = region.window.T
    changes = np.flatnonzero(sequence[1:] != sequence[:-1])
    if changes.size == 0:
        return np.array([height * width], dtype=np.int64)
    # Position k of the sequence -> its pixel number in the frame; the stand-in 0 of a
    # column (and the end of the sequence) maps to the first pixel after the window's part
    # of that column.
    column_index, row = np.divmod(changes, column)
    bounds = (x1 + column_index) * height + y1 + row
    counts = np.diff(bounds, prepend=0)
    rest = height * width - int(bounds[-1])
    return np.append(counts, rest) if rest > 0 else counts


def decode_rle(rle: dict) -> np.ndarray:
    """The HxW bool mask of a COCO RLE (compressed string or bytes counts)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode()
    height, width = (int(v) for v in rle["size"])
    decoded = coco_mask.decode({"size": [height, width], "counts": counts})
    return np.ascontiguousarray(decoded, dtype=bool)


def id_mask(
    masks: np.ndarray | Sequence[RegionMask],
    track_ids: Sequence[int],
    frame_size: tuple[int, int],
) -> np.ndarray:
    """Paint N masks into one HxW image whose pixel value is the track id (0: none).

    Args:
        masks: NxHxW bool (or integer, nonzero = inside), or N RegionMask; N may be 0.
        track_ids: N ids in 1..MAX_TRACK_ID (0 is the background).
        frame_size: ``(height, width)`` of the frame.

    Returns uint8 when every id is at most 255 (a palette PNG's index, as before ids could
    be larger), else uint16. Where masks overlap, the later track wins. Each mask is painted
    inside its window only.
    """
    height, width = frame_size
    regions = as_region_masks(masks, frame_size)
    if len(regions) != len(track_ids):
        raise ValueError(f"got {len(regions)} masks for {len(track_ids)} tracks")
    check_track_ids(track_ids)
    wide = any(int(track_id) > MAX_8BIT_ID for track_id in track_ids)
    painted = np.zeros((height, width), dtype=np.uint16 if wide else np.uint8)
    for region, track_id in zip(regions, track_ids, strict=True):
        painted[region.slices][region.window] = int(track_id)
    return painted


def check_track_ids(track_ids: Sequence[int]) -> None:
    """Raise ValueError unless every id fits an id mask: 1..MAX_TRACK_ID (0 is background)."""
    for track_id in track_ids:
        if not 1 <= int(track_id) <= MAX_TRACK_ID:
            raise ValueError(
                f"track id {track_id} cannot be stored in an id mask: ids must be 1..{MAX_TRACK_ID}"
            )


def read_id_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The HxW track ids of a ``masks/NNNNNN.png``: uint8 from an 8-bit palette PNG, uint16
    from a 16-bit one (a frame with an id above 255). The palette is ignored: the pixel
    values are the ids."""
    with Image.open(path) as png:
        if png.format != "PNG" or png.mode not in ("P", "L", "I;16", "I;16B", "I"):
            raise ValueError(
                f"{path} is not a samstream id PNG (8-bit palette or 16-bit grayscale), got "
                f"{png.format} mode {png.mode}"
            )
        ids = np.asarray(png)
    if ids.dtype == np.uint8:
        return ids
    # Pillow may widen 16-bit pixels to 32-bit ("I"); their values fit 16 bits.
    return ids.astype(np.uint16)


def remove_unfinished(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files a MaskWriter that was killed left in ``out_dir`` (hidden
    ``.NAME.*.tmp`` beside the outputs it would have become); one that ends leaves none.
    Returns what was removed."""
    out_dir = Path(out_dir)
    found = [path for name in (JSONL, MOT, OVERLAY) for path in out_dir.glob(f".{name}.*.tmp")]
    found += (out_dir / MASKS_DIR).glob(".*.png.*.tmp")
    for path in found:
        path.unlink(missing_ok=True)
    return found
