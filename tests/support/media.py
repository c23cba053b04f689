"""Synthetic media for tests, encoded with PyAV (nothing is downloaded).

`make_clip` writes a small clip of a bright rectangle moving at constant velocity over a dark,
textured, static background: easy enough for a tracker to follow, textured enough that an
encoder has real work to do. `clip_box` gives the rectangle's ground-truth box for any frame,
so tracker tests can compare against it.

The other writers make the timestamp troubles of real-world files, each from the same frames:
`make_pts_as_dts_mp4` (B-frames whose pts were written as their dts: reordered pts once
decoded), `make_b_frame_avi` (B-frames in AVI, which stores no pts: the same once decoded),
`make_concatenated_ts` (two MPEG-TS clips of different sizes appended byte by byte: the
timestamps jump back and the size changes at the junction). A clip without any timestamps is
`make_clip` with a ``.h264`` suffix: a raw H.264 elementary stream has neither pts nor dts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
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


def _write_packets(
    path: Path,
    *,
    frames: int,
    size: tuple[int, int],
    fps: int,
    codec: str,
    options: dict[str, str],
    retime: Callable[[av.Packet], None] | None = None,
) -> Path:
    """Encode the synthetic clip with encoder ``options``; ``retime`` may rewrite each
    packet's pts/dts before it is muxed, to make the broken timestamps some writers make."""
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base

        def mux(packets: list[av.Packet]) -> None:
            for packet in packets:
                if retime is not None:
                    retime(packet)
                container.mux(packet)

        for i in range(frames):
            rgb = clip_frame(i, frames=frames, size=size)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, time_base
            mux(stream.encode(frame))
        mux(stream.encode(None))
    return path


def damage_packets(
    source: Path | str, path: Path | str, packets: Collection[int], *, seed: int = 0
) -> Path:
    """A copy of ``source`` whose video packets number ``packets`` (0-based, in file order)
    hold random bytes of their own size: what a damaged file or a lossy link hands the
    decoder, which fails on each of them. The container, the timestamps and every other
    packet stay as they were."""
    rng = np.random.default_rng(seed)
    with av.open(str(source)) as inp, av.open(str(path), mode="w") as out:
        video = inp.streams.video[0]
        stream = out.add_stream_from_template(video)
        for index, packet in enumerate(p for p in inp.demux(video) if p.size):
            if index in packets:
                garbage = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                garbage.pts, garbage.dts = packet.pts, packet.dts
                garbage.time_base, garbage.is_keyframe = packet.time_base, packet.is_keyframe
                packet = garbage
            packet.stream = stream
            out.mux(packet)
    return Path(path)


def make_pts_as_dts_mp4(
    path: Path | str, *, frames: int = 30, size: tuple[int, int] = (160, 120), fps: int = 25
) -> Path:
    """An H.264 MP4 with B-frames whose packets carry pts == dts (dts starting at 0), as
    some muxers write them: decoded, the pts come out of order while the dts increase."""
    first_dts: list[int] = []

    def pts_from_dts(packet: av.Packet) -> None:
        if packet.dts is None:
            return
        if not first_dts:
            first_dts.append(packet.dts)
        # From 0: the MP4 demuxer's edit list would drop frames with a negative pts.
        packet.dts -= first_dts[0]
        packet.pts = packet.dts

    return _write_packets(
        Path(path),
        frames=frames,
        size=size,
        fps=fps,
        codec="libx264",
        options={"bf": "3"},
        retime=pts_from_dts,
    )


def make_b_frame_avi(
    path: Path | str, *, frames: int = 30, size: tuple[int, int] = (160, 120), fps: int = 25
) -> Path:
    """An AVI of H.264 with one B-frame between references. AVI stores no pts: the demuxer
    numbers the packets in decode order, and the decoder's reordering hands those numbers
    out of order (1, 3, 2, 5, 4, ...) while the dts increase, as in OpenCV's Megamind.avi.
    (MPEG-4 part 2 B-frames, what Megamind.avi has, decode in order from an AVI that FFmpeg
    wrote: only DivX's packed B-frames break them, and FFmpeg does not write those.)"""
    return _write_packets(
        Path(path), frames=frames, size=size, fps=fps, codec="libx264", options={"bf": "1"}
    )


def make_concatenated_ts(
    path: Path | str,
    *,
    sizes: Sequence[tuple[int, int]] = ((160, 120), (128, 96)),
    frames: int = 30,
    fps: int = 15,
) -> Path:
    """Separately encoded MPEG-TS clips, one per size in ``sizes``, appended byte by byte
    (``cat a.ts b.ts``). Every part starts at the same timestamp, so at each junction the
    timestamps jump back by a part's length (2 s by default) and the frame size changes."""
    path = Path(path)
    data = bytearray()
    for number, size in enumerate(sizes):
        part = path.with_name(f"{path.stem}.part{number}.ts")
        _write_packets(part, frames=frames, size=size, fps=fps, codec="libx264", options={})
        data += part.read_bytes()
        part.unlink()
    path.write_bytes(bytes(data))
    return path
