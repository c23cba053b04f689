"""File outputs of the mask publisher: id PNGs, COCO-RLE JSON lines, MOT boxes, overlay video.

Everything is written under a temporary name in the destination directory and moved into
place with ``os.replace`` once complete, so a crash never leaves a half-written file under a
final name (a reader either sees the whole file or none). Per-frame PNGs are moved into place
one by one as each frame is written; the three whole-run files when the writer is closed.

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

import io
import json
import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.outputs.drawing import PALETTE, draw_overlay
from pipeline.wire.masks import RegionMask, as_region_masks
from pipeline.wire.messages import MAX_TRACK_ID, TrackRecord, TrackState

__all__ = [
    "MOT_STATES",
    "PALETTE",
    "MaskWriter",
    "decode_rle",
    "encode_rle",
    "id_mask",
    "read_id_mask",
]

# The largest id an 8-bit palette PNG holds; a frame with a larger one is written in 16 bits.
MAX_8BIT_ID = 255

# Track states whose boxes go into the MOT file: a lost track's box is a stale prediction.
MOT_STATES = frozenset(s.value for s in TrackState if s is not TrackState.LOST)


# -- mask encodings -------------------------------------------------------------------------


def _as_bool_mask(mask: np.ndarray, ndim: int, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {mask.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        # Floats are probabilities or logits: which threshold is right is the caller's call.
        raise ValueError(f"{what} must be bool or integer (nonzero = inside), got {mask.dtype}")
    return mask.astype(bool, copy=False)


def encode_rle(mask: np.ndarray | RegionMask) -> dict:
    """COCO compressed RLE of an HxW mask: ``{"size": [h, w], "counts": str}``.

    Nonzero pixels are inside. The counts are the column-major (Fortran order) runs that
    COCO tools expect, as an ASCII string so the result is JSON-ready. A RegionMask is
    encoded from its window (the runs of the rest of the frame are known: all zeros), with
    the same bytes as encoding its full frame.
    """
    if isinstance(mask, RegionMask):
        height, width = mask.frame_size
        counts = _window_runs(mask)
        rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        mask = _as_bool_mask(mask, 2, "mask")
        rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
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
    regions = _check_masks(masks, len(track_ids), frame_size)
    for track_id in track_ids:
        if not 1 <= int(track_id) <= MAX_TRACK_ID:
            raise ValueError(
                f"track id {track_id} cannot be stored in an id mask: ids must be 1..{MAX_TRACK_ID}"
            )
    wide = any(int(track_id) > MAX_8BIT_ID for track_id in track_ids)
    painted = np.zeros((height, width), dtype=np.uint16 if wide else np.uint8)
    for region, track_id in zip(regions, track_ids, strict=True):
        painted[region.slices][region.window] = int(track_id)
    return painted


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


def _check_masks(
    masks: np.ndarray | Sequence[RegionMask], count: int, frame_size: tuple[int, int]
) -> tuple[RegionMask, ...]:
    """The masks as RegionMasks, checked against the track count and the frame size."""
    if isinstance(masks, np.ndarray):
        masks = _as_bool_mask(masks, 3, "masks")
        if masks.shape[0] != count:
            raise ValueError(f"got {masks.shape[0]} masks for {count} tracks")
        if count and masks.shape[1:] != tuple(frame_size):
            raise ValueError(
                f"masks are {masks.shape[1]}x{masks.shape[2]} but frame_size is "
                f"{tuple(frame_size)}; frame_size is (height, width) and masks must be at "
                "the frame's size"
            )
        return tuple(RegionMask.from_dense(mask) for mask in masks)
    regions = as_region_masks(masks, frame_size)
    if len(regions) != count:
        raise ValueError(f"got {len(regions)} masks for {count} tracks")
    return regions


# -- the writer -----------------------------------------------------------------------------


class MaskWriter:
    """Writes the file outputs of a run, frame by frame, in the order frames are given.

    Usage::

        with MaskWriter(out_dir, overlay_fps=Fraction(25)) as writer:
            for ...:
                writer.write(frame_index=..., seq=..., pts=..., time_base=..., frame_size=(h, w),
                             tracks=tracks, masks=masks, image=rgb)
        # on success the files are in place; on an exception nothing is left under final names

    ``overlay_fps`` is only used to time overlay frames that have no pts (frame index /
    fps); frames with pts keep their own timestamps.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        write_png: bool = True,
        write_jsonl: bool = True,
        write_mot: bool = True,
        write_overlay: bool = True,
        overlay_fps: Fraction | None = None,
        resume_frames: int = 0,
    ) -> None:
        """``resume_frames``: continue the outputs of an interrupted run in ``out_dir``,
        whose first ``resume_frames`` frames are complete there: their JSON lines, MOT lines
        and overlay frames are carried into the new files, their PNGs stay; the next frame
        written must be frame ``resume_frames``. Raises ValueError when those outputs are not
        there as a complete prefix."""
        if overlay_fps is not None and overlay_fps <= 0:
            raise ValueError(f"overlay_fps must be positive, got {overlay_fps}")
        if resume_frames < 0:
            raise ValueError(f"resume_frames must be >= 0, got {resume_frames}")
        self.out_dir = Path(out_dir)
        self.write_png = write_png
        self.write_overlay = write_overlay
        self.overlay_fps = Fraction(overlay_fps) if overlay_fps is not None else None
        self.frames_written = resume_frames  # an interrupted run's frames count as written
        self.overlay_rescaled_frames = 0  # frames scaled to the overlay's (first) size
        self.overlay_retimed_frames = 0  # frames moved one tick to keep timestamps increasing
        self.out_dir.mkdir(parents=True, exist_ok=True)

        self._state = "open"  # -> "closed" | "aborted"
        self._result: dict[str, Path] = {}
        self._pngs: list[Path] = []
        self._created_masks_dir = False
        self._text: dict[str, tuple[Path, IO[str]]] = {}  # final name -> (temporary, file)
        self._overlay: tuple[av.container.OutputContainer, av.VideoStream] | None = None
        self._overlay_temp: Path | None = None
        self._overlay_time_base: Fraction | None = None  # fixed by the first frame
        self._overlay_size: tuple[int, int] | None = None  # (height, width) of the input
        self._overlay_last_pts: int | None = None
        self._overlay_prefix: Path | None = None  # an interrupted run's overlay, to carry on
        self.first_frame = resume_frames  # the index the next write() must have
        jsonl_prefix, mot_prefix = _check_prefix(
            self.out_dir,
            resume_frames,
            png=write_png,
            jsonl=write_jsonl,
            mot=write_mot,
            overlay=write_overlay,
        )
        try:
            if write_jsonl:
                self._text["masks.jsonl"] = self._open_text_temp("masks.jsonl")
                self._text["masks.jsonl"][1].writelines(jsonl_prefix)
            if write_mot:
                self._text["tracks.txt"] = self._open_text_temp("tracks.txt")
                self._text["tracks.txt"][1].writelines(mot_prefix)
        except BaseException:
            self.abort()
            raise
        if write_overlay and resume_frames:
            self._overlay_prefix = self.out_dir / "overlay.mp4"

    def _temp_path(self, directory: Path, final_name: str) -> tuple[int, Path]:
        # Same directory as the final file, so os.replace is a rename, never a copy; hidden
        # so tools globbing the output directory do not pick it up.
        fd, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
        # mkstemp makes the file 0600; outputs get what any new file gets (0644 under the
        # usual umask), so other users and tools can read them once they are in place.
        umask = os.umask(0)  # the only way to read it is to set it: put it back at once
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        return fd, Path(name)

    def _open_text_temp(self, final_name: str) -> tuple[Path, IO[str]]:
        fd, path = self._temp_path(self.out_dir, final_name)
        return path, os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    # -- per frame -----------------------------------------------------------------------------

    def write(
        self,
        *,
        frame_index: int,
        seq: int,
        pts: int | None,
        time_base: tuple[int, int],
        frame_size: tuple[int, int],
        tracks: Sequence[TrackRecord],
        masks: np.ndarray | Sequence[RegionMask],
        image: np.ndarray | None,
        source_pts: int | None = None,
    ) -> None:
        """Write one frame's outputs.

        Args:
            frame_index: 0-based index of the frame in the source (names the PNG).
            seq: the message sequence number, recorded in the JSON line.
            pts: presentation timestamp in ``time_base`` units, or None.
            time_base: ``(numerator, denominator)`` of the pts unit in seconds.
            frame_size: ``(height, width)``.
            tracks: N tracks, in the order of ``masks``.
            masks: NxHxW bool masks at the frame's size, or N RegionMask of the frame
                (each output is then made from the masks' windows: the work per track
                follows its area, and the files are the same).
            image: HxWx3 uint8 RGB frame; required when the overlay is written.
            source_pts: the container's own pts when the decoder repaired it (``pts`` is the
                repaired one), recorded in the JSON line; None when they are the same.

        Everything is checked before anything is written, so a ValueError leaves the
        outputs as they were.
        """
        if self._state != "open":
            raise RuntimeError(f"MaskWriter is {self._state}; create a new one")
        height, width = (int(v) for v in frame_size)
        if frame_index < 0 or height <= 0 or width <= 0:
            raise ValueError(f"bad frame_index {frame_index} or frame_size {frame_size}")
        if frame_index < self.first_frame:
            raise ValueError(
                f"frame {frame_index} is before frame {self.first_frame}, where these outputs "
                "continue an interrupted run"
            )
        num, den = (int(v) for v in time_base)
        if den <= 0 or num <= 0:
            raise ValueError(f"time_base must be two positive ints (num, den), got {time_base}")
        masks = _check_masks(masks, len(tracks), (height, width))
        ids = [int(track.track_id) for track in tracks]
        painted = id_mask(masks, ids, (height, width)) if self.write_png else None
        overlay_timing = None
        if self.write_overlay:
            overlay_timing = self._overlay_timing(frame_index, pts, Fraction(num, den), image)
            if image is not None and image.shape[:2] != (height, width):
                raise ValueError(
                    f"image is {image.shape[0]}x{image.shape[1]} but frame_size is "
                    f"{(height, width)} (height, width)"
                )

        if "masks.jsonl" in self._text:
            line = {
                "frame": int(frame_index),
                "seq": int(seq),
                "pts": None if pts is None else int(pts),
                "time": None if pts is None else float(Fraction(int(pts) * num, den)),
                **({} if source_pts is None else {"source_pts": int(source_pts)}),
                "tracks": [
                    {
                        "id": track.track_id,
                        "box": list(track.box),
                        "score": track.score,
                        "state": track.state,
                        "rle": encode_rle(mask),
                    }
                    for track, mask in zip(tracks, masks, strict=True)
                ],
            }
            self._text["masks.jsonl"][1].write(json.dumps(line, allow_nan=False) + "\n")
        if "tracks.txt" in self._text:
            lines = [
                _mot_line(frame_index, track.track_id, track.box, track.score)
                for track in tracks
                if track.state in MOT_STATES
            ]
            self._text["tracks.txt"][1].write("".join(lines))
        if painted is not None:
            self._write_png(frame_index, painted)
        if overlay_timing is not None and image is not None:
            self._write_overlay_frame(image, tracks, masks, *overlay_timing)
        self.frames_written += 1

    def _write_png(self, frame_index: int, painted: np.ndarray) -> None:
        masks_dir = self.out_dir / "masks"
        if not masks_dir.exists():
            masks_dir.mkdir()
            self._created_masks_dir = True
        final = masks_dir / f"{frame_index:06d}.png"
        if painted.dtype == np.uint8:
            png = Image.fromarray(painted)  # mode "L", which the palette makes "P"
            png.putpalette(PALETTE)
            with io.BytesIO() as stream:
                png.save(stream, format="PNG")
                encoded = stream.getvalue()
        else:
            # An id above 255: a palette holds 256 entries, so 16-bit grayscale, ids as they
            # are (OpenCV writes 16-bit PNGs as such; a viewer sees them nearly black).
            ok, buffer = cv2.imencode(".png", np.ascontiguousarray(painted, dtype=np.uint16))
            if not ok:
                raise RuntimeError(f"OpenCV could not encode the 16-bit PNG of frame {frame_index}")
            encoded = buffer.tobytes()
        fd, temp = self._temp_path(masks_dir, final.name)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(encoded)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._pngs.append(final)

    # -- overlay -------------------------------------------------------------------------------

    def _overlay_timing(
        self, frame_index: int, pts: int | None, time_base: Fraction, image: np.ndarray | None
    ) -> tuple[int, Fraction]:
        """The frame's overlay pts and the overlay's time base; raises on unusable input.

        The first frame fixes the overlay's time base: the input's own when it has a pts (so
        the pts are copied unchanged), else ``1 / overlay_fps``.
        """
        if image is None:
            raise ValueError(
                f"frame {frame_index}: the overlay video needs the frame's image; pass image= "
                "or create the MaskWriter with write_overlay=False"
            )
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
        if pts is None and self.overlay_fps is None:
            raise ValueError(
                f"frame {frame_index} has no pts: create the MaskWriter with overlay_fps= so "
                "the overlay can time frames by their index"
            )
        if pts is not None:
            seconds, own_time_base = int(pts) * time_base, time_base
        else:
            fps = self.overlay_fps or Fraction(1)  # not None: checked above
            seconds, own_time_base = frame_index / fps, 1 / fps
        stream_time_base = self._overlay_time_base or own_time_base
        out_pts = round(seconds / stream_time_base)  # exact when the time bases are equal
        if self._overlay_last_pts is not None and out_pts <= self._overlay_last_pts:
            # The decoder hands out strictly increasing pts, but a frame of another time base
            # can round onto its predecessor: one tick later keeps the video valid (a muxer
            # refuses equal timestamps) and costs nothing a viewer could see.
            out_pts = self._overlay_last_pts + 1
            self.overlay_retimed_frames += 1
        return out_pts, stream_time_base

    def _open_overlay(
        self, height: int, width: int, time_base: Fraction
    ) -> tuple[av.container.OutputContainer, av.VideoStream]:
        fd, temp = self._temp_path(self.out_dir, "overlay.mp4")
        os.close(fd)  # FFmpeg opens the path itself
        self._overlay_temp = temp
        # The mp4 muxer would otherwise pick its own timescale (e.g. 1/12800 for 1/25) and
        # rescale every pts; a multiple of the input's denominator keeps timestamps exact. It
        # must not be coarse: at 1/10 s the muxer's edit list cuts the last frame away.
        timescale = time_base.denominator * -(-1000 // time_base.denominator)
        container = av.open(
            str(temp),
            mode="w",
            format="mp4",
            container_options={"video_track_timescale": str(timescale)},
        )
        stream = container.add_stream("libx264", options={"preset": "veryfast"})
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        self._overlay = (container, stream)
        self._overlay_time_base = time_base
        self._overlay_size = (height, width)
        if self._overlay_prefix is not None:
            self._carry_overlay_prefix(container, stream, time_base)
        return self._overlay

    def _carry_overlay_prefix(
        self,
        container: av.container.OutputContainer,
        stream: av.VideoStream,
        time_base: Fraction,
    ) -> None:
        """Re-encode the interrupted run's overlay frames at their own timestamps.

        (Copying its packets would avoid a second generation of H.264 loss, but the mp4
        muxer drops packets of another encoder's stream; a viewer's overlay can afford it.)"""
        prefix, self._overlay_prefix = self._overlay_prefix, None
        if prefix is None:
            return
        height, width = stream.height, stream.width
        with av.open(str(prefix)) as old:
            for frame in old.decode(video=0):
                if frame.pts is None or frame.time_base is None:
                    raise ValueError(f"{prefix}: a frame without a timestamp; cannot resume it")
                out_pts = round(frame.pts * frame.time_base / time_base)
                if self._overlay_last_pts is not None and out_pts <= self._overlay_last_pts:
                    out_pts = self._overlay_last_pts + 1
                if (frame.height, frame.width) != (height, width):
                    frame = frame.reformat(width=width, height=height)
                rgb = frame.to_ndarray(format="rgb24")
                new = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                new.pts, new.time_base = out_pts, time_base
                container.mux(stream.encode(new))
                self._overlay_last_pts = out_pts

    def _write_overlay_frame(
        self,
        image: np.ndarray,
        tracks: Sequence[TrackRecord],
        masks: Sequence[RegionMask],
        out_pts: int,
        time_base: Fraction,
    ) -> None:
        container, stream = self._overlay or self._open_overlay(*image.shape[:2], time_base)
        canvas = draw_overlay(
            image,
            masks,
            [t.track_id for t in tracks],
            [None if t.state == TrackState.LOST else t.box for t in tracks],
            labels=[
                str(t.track_id) if t.state == TrackState.TRACKED else f"{t.track_id} {t.state}"
                for t in tracks
            ],
        )
        height, width = self._overlay_size or image.shape[:2]
        if canvas.shape[:2] != (height, width):
            # A mid-stream size change (concatenated files, a camera switching profile): the
            # video keeps its first size, the frame is scaled to it (its masks and PNGs keep
            # the frame's own size).
            canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
            self.overlay_rescaled_frames += 1
        if height % 2 or width % 2:
            canvas = np.pad(canvas, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
        frame.pts = out_pts
        frame.time_base = time_base
        container.mux(stream.encode(frame))
        self._overlay_last_pts = out_pts

    # -- finishing -----------------------------------------------------------------------------

    def close(self) -> dict[str, Path]:
        """Finish every output and move it into place; return ``{kind: final path}``.

        Kinds: "masks" (the PNG directory), "jsonl", "mot", "overlay"; the overlay and the
        PNG directory only when at least one frame was written. Calling close again returns
        the same dict.
        """
        if self._state == "aborted":
            raise RuntimeError("MaskWriter was aborted; nothing was written")
        if self._state == "closed":
            return dict(self._result)
        try:
            # Finish everything that can fail first; the renames come last and are atomic.
            for _, file in self._text.values():
                file.close()
            if self._overlay is not None:
                container, stream = self._overlay
                container.mux(stream.encode(None))  # flush the frames the encoder holds back
                container.close()
                self._overlay = None
        except BaseException:
            self.abort()
            raise
        kinds = {"masks.jsonl": "jsonl", "tracks.txt": "mot"}
        for final_name, (temp, _) in self._text.items():
            final = self.out_dir / final_name
            os.replace(temp, final)
            self._result[kinds[final_name]] = final
        if self._overlay_temp is not None:
            final = self.out_dir / "overlay.mp4"
            os.replace(self._overlay_temp, final)
            self._result["overlay"] = final
        elif self._overlay_prefix is not None:  # resumed, but no frame came after the prefix
            self._result["overlay"] = self._overlay_prefix
        if self._pngs or (self.write_png and self.first_frame):
            self._result["masks"] = self.out_dir / "masks"
        self._state = "closed"
        return dict(self._result)

    def abort(self) -> None:
        """Discard everything: temporaries and the PNGs this writer already moved into place.

        Does nothing after close() (the outputs are complete) or a previous abort().
        """
        if self._state != "open":
            return
        self._state = "aborted"
        for temp, file in self._text.values():
            file.close()
            temp.unlink(missing_ok=True)
        if self._overlay is not None:
            try:
                self._overlay[0].close()
            except av.FFmpegError:
                pass  # the file is deleted next; a failed trailer does not matter
            self._overlay = None
        if self._overlay_temp is not None:
            self._overlay_temp.unlink(missing_ok=True)
        for png in self._pngs:
            png.unlink(missing_ok=True)
        if self._created_masks_dir:
            try:
                (self.out_dir / "masks").rmdir()
            except OSError:
                pass  # files of someone else are in it: leave them

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _mot_line(frame_index: int, track_id: int, box: Sequence[float], score: float) -> str:
    x1, y1, x2, y2 = box
    return (
        f"{frame_index + 1},{track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
        f"{score:.4f},-1,-1,-1\n"
    )


def remove_unfinished(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files a MaskWriter that was killed left in ``out_dir`` (hidden
    ``.NAME.*.tmp`` beside the outputs it would have become); one that ends leaves none.
    Returns what was removed."""
    out_dir = Path(out_dir)
    names = ("masks.jsonl", "tracks.txt", "overlay.mp4")
    found = [path for name in names for path in out_dir.glob(f".{name}.*.tmp")]
    found += (out_dir / "masks").glob(".*.png.*.tmp")
    for path in found:
        path.unlink(missing_ok=True)
    return found


def _check_prefix(
    out_dir: Path, frames: int, *, png: bool, jsonl: bool, mot: bool, overlay: bool
) -> tuple[list[str], list[str]]:
    """The JSON lines and MOT lines of the first ``frames`` frames of the outputs in
    ``out_dir`` (each [] when not written), every output checked to be all there."""
    if frames == 0:
        return [], []
    problem = f"cannot continue the outputs in {out_dir} from frame {frames}"
    jsonl_lines: list[str] = []
    if jsonl:
        path = out_dir / "masks.jsonl"
        if not path.is_file():
            raise ValueError(f"{problem}: {path} is missing")
        with open(path, encoding="utf-8") as file:
            for line in file:
                if len(jsonl_lines) == frames:
                    break
                record = json.loads(line)
                if record.get("frame") != len(jsonl_lines):
                    raise ValueError(
                        f"{problem}: line {len(jsonl_lines) + 1} of {path} is frame "
                        f"{record.get('frame')}, not {len(jsonl_lines)}"
                    )
                jsonl_lines.append(line)
        if len(jsonl_lines) < frames:
            raise ValueError(f"{problem}: {path} has only {len(jsonl_lines)} frames")
    mot_lines: list[str] = []
    if mot:
        path = out_dir / "tracks.txt"
        if not path.is_file():
            raise ValueError(f"{problem}: {path} is missing")
        with open(path, encoding="utf-8") as file:
            # MOT frame numbers are 1-based: frames 0..frames-1 are lines 1..frames.
            mot_lines = [line for line in file if int(line.split(",", 1)[0]) <= frames]
    if png:
        missing = [i for i in range(frames) if not (out_dir / "masks" / f"{i:06d}.png").is_file()]
        if missing:
            raise ValueError(f"{problem}: masks/{missing[0]:06d}.png is missing")
    if overlay and not (out_dir / "overlay.mp4").is_file():
        raise ValueError(f"{problem}: {out_dir / 'overlay.mp4'} is missing")
    return jsonl_lines, mot_lines
