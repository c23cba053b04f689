"""One sink per file format of a run: the id PNGs, the JSON lines, the MOT lines and the
overlay video. Formats and names: `pipeline.outputs.files`.

A sink is given one frame's MaskMessage at a time, in frame order, by `MaskWriter`
(`pipeline.outputs.writer`), which checks a frame with every sink before any writes it.
Each sink can continue an interrupted run's outputs: its first ``resume_frames`` frames are
checked to be there, and carried over (or left in place) as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import cv2
import numpy as np
from PIL import Image

from pipeline.outputs import files
from pipeline.outputs.atomic import AllOrNothing, AtomicFile
from pipeline.outputs.drawing import PALETTE, draw_overlay
from pipeline.wire.messages import MaskMessage, TrackRecord, TrackState


def resume_error(out_dir: Path, frames: int, problem: str) -> ValueError:
    """The error of outputs in ``out_dir`` that cannot be continued from frame ``frames``."""
    return ValueError(f"cannot continue the outputs in {out_dir} from frame {frames}: {problem}")


class Sink(AllOrNothing):
    """One output format, ``name`` under the output directory. Per frame: ``check`` (raises
    ValueError, writing nothing), then ``write``. At the end: ``finish`` (what can fail), then
    ``commit`` (the files into place; the final path, or None when there is none); or,
    instead, ``discard``. By default the output is one file, ``out``, written whole."""

    name: ClassVar[str]

    def __init__(self, out_dir: Path, resume_frames: int = 0) -> None:
        self.path = out_dir / self.name
        if resume_frames and not self.path.exists():
            raise resume_error(out_dir, resume_frames, f"{self.path} is missing")
        self.out: AtomicFile | None = None  # the file being written, once there is one

    def check(self, msg: MaskMessage) -> None:
        """Raise ValueError if this sink cannot write ``msg``; the default takes every frame."""

    def write(self, msg: MaskMessage) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the output without moving it into place (nothing to do by default)."""

    def commit(self) -> Path | None:
        return None if self.out is None else self.out.commit()

    def discard(self) -> None:
        if self.out is not None:
            self.out.discard()


class PngSink(Sink):
    """``masks/NNNNNN.png``, each in place as soon as its frame is written: 8-bit palette
    while every id of the frame is at most 255, else 16-bit grayscale."""

    name = files.MASKS_DIR

    def __init__(self, out_dir: Path, resume_frames: int = 0) -> None:
        super().__init__(out_dir, resume_frames)
        for index in range(resume_frames):
            if not (self.path / f"{index:06d}.png").is_file():
                raise resume_error(out_dir, resume_frames, f"masks/{index:06d}.png is missing")
        self.resumed = resume_frames > 0
        self.written: list[Path] = []
        self.created_dir = False

    def check(self, msg: MaskMessage) -> None:
        files.check_track_ids([track.track_id for track in msg.tracks])

    def write(self, msg: MaskMessage) -> None:
        painted = files.id_mask(msg.masks, [track.track_id for track in msg.tracks], msg.frame_size)
        if not self.path.exists():
            self.path.mkdir()
            self.created_dir = True
        # uint8: mode "L", which the palette makes "P". uint16 (an id above 255; a palette
        # holds 256 entries): mode "I;16", a 16-bit grayscale PNG of the ids as they are.
        png = Image.fromarray(painted)
        if painted.dtype == np.uint8:
            png.putpalette(PALETTE)
        with AtomicFile(self.path / f"{msg.meta.frame_index:06d}.png") as out:
            png.save(out.file, format="PNG")
        self.written.append(out.path)

    def commit(self) -> Path | None:
        return self.path if self.written or self.resumed else None

    def discard(self) -> None:
        """Delete the PNGs this sink wrote (an interrupted run's stay)."""
        for png in self.written:
            png.unlink(missing_ok=True)
        if self.created_dir:
            with contextlib.suppress(OSError):  # files of someone else are in it: leave them
                self.path.rmdir()


class LinesSink(Sink):
    """A text file of lines, written under a temporary name and moved into place at the end;
    a resumed one starts with the interrupted run's lines of its first frames."""

    out: AtomicFile  # made by the constructor

    def __init__(self, out_dir: Path, resume_frames: int = 0) -> None:
        super().__init__(out_dir, resume_frames)
        prefix: list[bytes] = []
        if resume_frames:
            with open(self.path, "rb") as file:
                prefix = self.prefix(file, resume_frames)
        self.out = AtomicFile(self.path)
        try:
            self.out.file.writelines(prefix)
        except BaseException:
            self.out.discard()
            raise

    def prefix(self, file: Iterable[bytes], frames: int) -> list[bytes]:
        """The lines of frames 0..frames-1 in ``file``; a `resume_error` when they are not
        all there."""
        raise NotImplementedError

    def lines(self, msg: MaskMessage) -> str:
        """The frame's lines, each ending in a newline."""
        raise NotImplementedError

    def write(self, msg: MaskMessage) -> None:
        self.out.file.write(self.lines(msg).encode())

    def finish(self) -> None:
        self.out.file.close()


class JsonLinesSink(LinesSink):
    """``masks.jsonl``: one JSON object per frame, its tracks with their masks in COCO RLE."""

    name = files.JSONL

    def prefix(self, file: Iterable[bytes], frames: int) -> list[bytes]:
        found = list(itertools.islice(file, frames))
        for index, line in enumerate(found):
            frame = json.loads(line).get("frame")
            if frame != index:
                problem = f"line {index + 1} of {self.path} is frame {frame}, not {index}"
                raise resume_error(self.path.parent, frames, problem)
        if len(found) < frames:
            problem = f"{self.path} has only {len(found)} frames"
            raise resume_error(self.path.parent, frames, problem)
        return found

    def lines(self, msg: MaskMessage) -> str:
        meta = msg.meta
        line = {
            "frame": int(meta.frame_index),
            "seq": int(meta.seq),
            "pts": None if meta.pts is None else int(meta.pts),
            "time": meta.time_seconds,  # pts * time_base: the same float as Fraction's
            **({} if meta.source_pts is None else {"source_pts": int(meta.source_pts)}),
            "tracks": [
                {
                    "id": track.track_id,
                    "box": list(track.box),
                    "score": track.score,
                    "state": track.state,
                    "rle": files.encode_rle(mask),
                }
                for track, mask in zip(msg.tracks, msg.masks, strict=True)
            ],
        }
        return json.dumps(line, allow_nan=False) + "\n"


class MotSink(LinesSink):
    """``tracks.txt``: MOT Challenge lines (frames 1-based) of the tracks that are not lost (a
    lost track's box is a stale prediction)."""

    name = files.MOT

    def prefix(self, file: Iterable[bytes], frames: int) -> list[bytes]:
        # MOT frame numbers are 1-based: frames 0..frames-1 are lines 1..frames.
        return [line for line in file if int(line.split(b",", 1)[0]) <= frames]

    def lines(self, msg: MaskMessage) -> str:
        number = msg.meta.frame_index + 1
        return "".join(self.line(number, t) for t in msg.tracks if t.state != TrackState.LOST)

    @staticmethod
    def line(number: int, track: TrackRecord) -> str:
        """``frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1`` and a newline."""
        x1, y1, x2, y2 = track.box
        return (
            f"{number},{track.track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
            f"{track.score:.4f},-1,-1,-1\n"
        )


class OverlaySink(Sink):
    """Writes ``overlay.mp4`` under a temporary name, moved into place at ``commit``.

    ``fps`` times the frames that have no pts (frame index / fps); frames with pts keep their
    own timestamps. The first frame fixes the video's time base: the input's own when it has
    a pts (so the pts are copied unchanged), else ``1 / fps``. A resumed sink re-encodes the
    interrupted run's video first.
    """

    name = files.OVERLAY

    def __init__(self, out_dir: Path, resume_frames: int = 0, fps: Fraction | None = None) -> None:
        if fps is not None and fps <= 0:
            raise ValueError(f"overlay_fps must be positive, got {fps}")
        super().__init__(out_dir, resume_frames)
        self.prefix = self.path if resume_frames else None  # the video to carry on
        self.fps = None if fps is None else Fraction(fps)
        self.video: tuple[av.container.OutputContainer, av.VideoStream] | None = None
        self.time_base = Fraction(1)  # of the video, once the first frame has set it
        self.size = (0, 0)  # (height, width) of the video, once the first frame has set it
        self.last_pts: int | None = None
        self.rescaled_frames = 0  # frames scaled to the video's (first) size
        self.retimed_frames = 0  # frames moved one tick to keep timestamps increasing

    def check(self, msg: MaskMessage) -> None:
        index = msg.meta.frame_index
        if msg.image is None:
            raise ValueError(
                f"frame {index}: the overlay video needs the frame's image; pass image= "
                "or create the MaskWriter with write_overlay=False"
            )
        if msg.meta.pts is None and self.fps is None:
            raise ValueError(
                f"frame {index} has no pts: create the MaskWriter with overlay_fps= so "
                "the overlay can time frames by their index"
            )

    def write(self, msg: MaskMessage) -> None:
        image, meta, tracks = msg.image, msg.meta, msg.tracks  # an image: check() says so
        # The frame's time: pts in its time base, else its index at fps (check() says so).
        if meta.pts is None:
            ticks, time_base = meta.frame_index, 1 / self.fps
        else:
            ticks, time_base = meta.pts, Fraction(*meta.time_base)
        if self.video is None:
            self._open(*image.shape[:2], time_base)
        canvas = draw_overlay(
            image,
            msg.masks,
            [t.track_id for t in tracks],
            [None if t.state == TrackState.LOST else t.box for t in tracks],
            labels=[
                str(t.track_id) if t.state == TrackState.TRACKED else f"{t.track_id} {t.state}"
                for t in tracks
            ],
        )
        height, width = self.size
        if canvas.shape[:2] != (height, width):
            # A mid-stream size change (concatenated files, a camera switching profile): the
            # video keeps its first size, the frame is scaled to it (its masks and PNGs keep
            # the frame's own size).
            canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
            self.rescaled_frames += 1
        if height % 2 or width % 2:
            canvas = np.pad(canvas, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        # The pts are exact when the time bases are equal.
        self.retimed_frames += self._encode(canvas, round(ticks * time_base / self.time_base))

    def _encode(self, rgb: np.ndarray, pts: int) -> bool:
        """One RGB frame of the video's (padded) size at ``pts``, or one tick after the
        previous frame where ``pts`` is not later; returns whether it was moved."""
        container, stream = self.video  # open: write() opens it first
        moved = False
        if self.last_pts is not None and pts <= self.last_pts:
            # The decoder hands out strictly increasing pts, but a frame of another time base
            # can round onto its predecessor: one tick later keeps the video valid (a muxer
            # refuses equal timestamps) and costs nothing a viewer could see.
            pts, moved = self.last_pts + 1, True
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        container.mux(stream.encode(frame))
        self.last_pts = pts
        return moved

    def _open(self, height: int, width: int, time_base: Fraction) -> None:
        self.out = AtomicFile(self.path)
        self.out.file.close()  # FFmpeg opens the path itself
        # The mp4 muxer would otherwise pick its own timescale (e.g. 1/12800 for 1/25) and
        # rescale every pts; a multiple of the input's denominator keeps timestamps exact. It
        # must not be coarse: at 1/10 s the muxer's edit list cuts the last frame away.
        timescale = time_base.denominator * -(-1000 // time_base.denominator)
        container = av.open(
            str(self.out.temp),
            mode="w",
            format="mp4",
            container_options={"video_track_timescale": str(timescale)},
        )
        stream = container.add_stream("libx264", options={"preset": "veryfast"})
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = time_base
        self.video, self.time_base, self.size = (container, stream), time_base, (height, width)
        if self.prefix is not None:
            self._carry_prefix(self.prefix, stream.width, stream.height)

    def _carry_prefix(self, prefix: Path, width: int, height: int) -> None:
        """Re-encode the interrupted run's overlay frames at their own timestamps, at the
        video's ``width`` x ``height`` (padded).

        (Copying its packets would avoid a second generation of H.264 loss, but the mp4
        muxer drops packets of another encoder's stream; a viewer's overlay can afford it.)"""
        with av.open(str(prefix)) as old:
            for frame in old.decode(video=0):
                if frame.pts is None or frame.time_base is None:
                    raise ValueError(f"{prefix}: a frame without a timestamp; cannot resume it")
                if (frame.height, frame.width) != (height, width):
                    frame = frame.reformat(width=width, height=height)
                pts = round(frame.pts * frame.time_base / self.time_base)
                self._encode(frame.to_ndarray(format="rgb24"), pts)
        self.prefix = None

    def finish(self) -> None:
        if self.video is not None:
            container, stream = self.video
            container.mux(stream.encode(None))  # flush the frames the encoder holds back
            container.close()
            self.video = None

    def commit(self) -> Path | None:
        # Resumed, but no frame came after the prefix: the prefix (None: no frame at all).
        return super().commit() if self.out is not None else self.prefix

    def discard(self) -> None:
        if self.video is not None:
            with contextlib.suppress(av.FFmpegError):  # the file goes next: its trailer too
                self.video[0].close()
            self.video = None
        super().discard()
