"""Where frames come from: video files, FFmpeg test sources, RTSP cameras and webcams, via PyAV.

`parse_source` turns what a user typed into a `SourceSpec`; `VideoSource` opens it and yields
`DecodedFrame`s in decode order with their pts and time base, so time is always
``pts * time_base`` (variable frame rate safe), never derived from the frame index.

The pts handed out are the container's where they are well-formed, and repaired where they are
not (reordered, missing, jumping back: see pipeline/video/timestamps.py), so they always increase
strictly; a repaired frame keeps the container's value in ``source_pts``.

Broken input is reported as `SourceError` with the source and the problem in the message.
Damaged packets in the middle of a stream are skipped and counted rather than ending the
stream, because one bad packet in an hour of camera footage should cost one frame, not the run.
"""

from __future__ import annotations

import errno
import glob
import itertools
import logging
import math
import os
import re
import struct
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import av
import numpy as np

from pipeline.video.timestamps import RepairedTimestamp, TimestampRepairer
from pipeline.wire.messages import FrameMeta

log = logging.getLogger(__name__)

# A decoded picture waiting for its timestamp to be decided, and its decoding time in ms.
Decoded = tuple[av.VideoFrame, float]

SourceKind = Literal["file", "lavfi", "rtsp", "webcam"]

# Frames a file's decoder runs ahead of what it hands out, so that the timestamp repair sees
# the faults just ahead (Megamind.avi's first reordered pts shows one frame later). Frames
# wait as decoded pictures, converted to RGB only when handed out, to keep the memory small.
# Live sources wait for nothing: their latency matters more.
TIMESTAMP_LOOKAHEAD = 8
# A jump back of more than this is a restart of the timeline (concatenated files), not a
# reordering glitch: a second, or a few frames, whichever is less. (Nudged one tick at a
# time, a short clip joined after a long one came out as frames a tick apart.)
DISCONTINUITY_S = 1
DISCONTINUITY_FRAMES = 4

# FFmpeg's built-in test pattern generators that may be named without the "lavfi:" prefix.
_TESTSRC_RE = re.compile(r"^(testsrc2?)(?:[=:](.*))?$")
_WEBCAM_RE = re.compile(r"^/dev/video\d+$")

# Demuxer options every RTSP source gets unless the caller overrides them: UDP loses packets
# (smeared frames) on any busy network and is blocked by most NATs, TCP does neither.
RTSP_DEFAULT_OPTIONS = {"rtsp_transport": "tcp"}
# Credentials for an RTSP URL that carries none, so passwords stay out of configs and shell
# history. They are put into the URL handed to FFmpeg, never into anything printed.
RTSP_USER_ENV = "SAMSTREAM_RTSP_USER"
RTSP_PASSWORD_ENV = "SAMSTREAM_RTSP_PASSWORD"
# What FFmpeg's errors at the open of an RTSP source mean (a refusal, the server's error
# replies), to tell the user.
_RTSP_PROBLEMS: tuple[tuple[type[Exception], str], ...] = (
    (av.error.ConnectionRefusedError, "connection refused: no RTSP server is listening there"),
    (
        av.error.HTTPUnauthorizedError,
        "401 Unauthorized: wrong or missing credentials (in the "
        f"URL, or ${RTSP_USER_ENV} / ${RTSP_PASSWORD_ENV})",
    ),
    (av.error.HTTPForbiddenError, "403 Forbidden: this user may not open this stream"),
    (av.error.HTTPNotFoundError, "404 Not Found: the server has no stream at that path"),
    (av.error.HTTPServerError, "the server answered with a 5XX error: busy or failing"),
)


class SourceError(RuntimeError):
    """A video source cannot be opened or read; the message names the source and the problem.

    ``busy``: the source answered but refused for now (an RTSP server's error reply), so a
    retry can work, unlike a refused connection or a missing device."""

    def __init__(self, message: str, *, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class SourceStalled(SourceError):
    """A live source sent nothing for the read timeout (connected, but silent)."""


def redact(text: str, url: str) -> str:
    """``text`` with the password of ``url`` masked wherever it occurs, as the URL writes it
    and percent-encoded."""
    password = urllib.parse.urlsplit(url).password
    for secret in (password, urllib.parse.quote(password, safe="")) if password else ():
        text = text.replace(secret, "***")
    return text


def _with_env_credentials(url: str) -> str:
    """``url`` with $SAMSTREAM_RTSP_USER / $SAMSTREAM_RTSP_PASSWORD when it has no user."""
    parts = urllib.parse.urlsplit(url)
    user = os.environ.get(RTSP_USER_ENV)
    if parts.username or not user:
        return url
    userinfo = urllib.parse.quote(user, safe="")
    password = os.environ.get(RTSP_PASSWORD_ENV)
    if password:
        userinfo += ":" + urllib.parse.quote(password, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded video frame.

    Attributes:
        image: HxWx3 uint8 RGB, C-contiguous. Its size can change within a stream (a file
            made of parts of different sizes).
        meta: the frame's identity and timing, as the decoder node sends it: ``seq`` and
            ``frame_index`` its 0-based position in decode order; ``pts`` strictly greater
            than the previous frame's (the container's where well-formed, repaired where
            reordered, missing or jumping back, the container's then in ``source_pts``);
            ``capture_time`` when the source handed it out; ``session`` the live source's
            connection number.
        decode_ms: time spent decoding and converting this frame (not waiting for data).
    """

    image: np.ndarray
    meta: FrameMeta
    decode_ms: float = 0.0


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source: what to hand to ``av.open``.

    Attributes:
        url: path, RTSP URL (credentials included: never print it, print ``display_name``),
            device node, or (for kind "lavfi") a filter graph.
        kind: "file", "lavfi", "rtsp" or "webcam".
        options: FFmpeg demuxer options (``rtsp_transport``, ``video_size``, ...).
        format: FFmpeg input format to force ("lavfi", "v4l2"), None to probe.
    """

    url: str = field(repr=False)
    kind: SourceKind
    options: dict[str, str] = field(default_factory=dict)
    format: str | None = None

    @property
    def display_name(self) -> str:
        """The source as a user would write it, for messages, with any password masked."""
        if self.kind == "lavfi":
            return f"lavfi:{self.url}"
        password = urllib.parse.urlsplit(self.url).password if self.kind == "rtsp" else None
        # The password is the userinfo's text between its first ':' and the last '@': masked
        # there, the URL is otherwise as written.
        return self.url.replace(f":{password}@", ":***@", 1) if password else self.url

    @property
    def is_live(self) -> bool:
        """A camera (RTSP, webcam): it can stall or drop, and it does not wait for us."""
        return self.kind in ("rtsp", "webcam")

    def __repr__(self) -> str:
        return (
            f"SourceSpec(display_name={self.display_name!r}, kind={self.kind!r}, "
            f"options={self.options!r}, format={self.format!r})"
        )


def parse_source(
    source: str | os.PathLike[str], *, options: dict[str, str] | None = None
) -> SourceSpec:
    """Classify a user-supplied source string.

    - ``lavfi:GRAPH`` (e.g. ``lavfi:testsrc2=size=320x240:rate=25``): an FFmpeg filter-graph
      source. ``testsrc``/``testsrc2`` may also be written bare, with ``=`` or ``:`` after the
      name (``testsrc2:size=320x240`` means ``testsrc2=size=320x240``).
    - ``rtsp://...`` / ``rtsps://...``: an RTSP camera, with ``rtsp_transport=tcp`` unless
      ``options`` says otherwise. Without a user in the URL, ``$SAMSTREAM_RTSP_USER`` and
      ``$SAMSTREAM_RTSP_PASSWORD`` supply the credentials.
    - ``/dev/videoN`` or a bare integer N: a V4L2 webcam (``/dev/videoN``).
    - anything else: a file, which must exist.

    ``options`` are FFmpeg demuxer options; they override the defaults of the kind.

    Raises:
        SourceError: empty source, empty filter graph, or a file that does not exist, is a
            directory or is empty.
    """
    text = os.fspath(source).strip()
    user_options = {str(k): str(v) for k, v in (options or {}).items()}
    if not text:
        raise SourceError("no video source given (empty string)")

    testsrc = _TESTSRC_RE.match(text)
    if testsrc:  # testsrc2:size=320x240 is lavfi:testsrc2=size=320x240
        name, args = testsrc.groups()
        text = f"lavfi:{name}={args}" if args else f"lavfi:{name}"
    if text.startswith("lavfi:"):
        graph = text.removeprefix("lavfi:")
        if not graph:
            raise SourceError(f"video source {text!r} has an empty filter graph after 'lavfi:'")
        return SourceSpec(url=graph, kind="lavfi", options=user_options, format="lavfi")

    if text.lower().startswith(("rtsp://", "rtsps://")):
        rtsp_options = {**RTSP_DEFAULT_OPTIONS, **user_options}
        return SourceSpec(url=_with_env_credentials(text), kind="rtsp", options=rtsp_options)

    if text.isdigit():
        text = f"/dev/video{int(text)}"
    if _WEBCAM_RE.match(text):
        return SourceSpec(url=text, kind="webcam", options=user_options, format="v4l2")

    _check_file(text)
    return SourceSpec(url=text, kind="file", options=user_options, format=None)


class VideoSource:
    """Decodes one source into `DecodedFrame`s, in order, with threaded decoding.

    Usage::

        with VideoSource(parse_source("clip.mp4")) as source:
            for frame in source:
                ...

    A packet the decoder rejects (``av.InvalidDataError`` and other per-packet FFmpeg errors)
    is skipped and counted in ``corrupt_packets``; ``max_consecutive_errors`` such packets in
    a row raise `SourceError`, because by then the stream is garbage, not damaged.
    The source is read once: iterating again continues reading, it does not rewind.
    A live source may be `disconnect`ed and opened again: a new connection, whose frames are
    numbered on and counted with the others.

    Timestamps: every frame's ``pts`` is strictly greater than the previous one's (of the
    connection). Where the container's are reordered, missing or jump back they are repaired
    (`TimestampRepairer`; a file is decoded `TIMESTAMP_LOOKAHEAD` frames ahead for it), the
    first repair is logged once as a warning, and `timestamp_report` sums them up.
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        stream_id: str = "cam0",
        max_frames: int | None = None,
        max_consecutive_errors: int = 50,
        open_timeout_s: float = 10.0,
        read_timeout_s: float | None = None,
    ) -> None:
        """``stream_id``: the frames' ``meta.stream_id``. ``read_timeout_s``: a live source
        that delivers no packet for this long raises `SourceStalled` (None: wait forever,
        right for files). The values are checked where they enter
        (`pipeline.config.DecoderConfig`), not again here."""
        self.spec = spec
        self.stream_id = stream_id
        self.read_timeout_s = read_timeout_s
        self.max_frames = max_frames
        self.max_consecutive_errors = max_consecutive_errors
        self.open_timeout_s = open_timeout_s
        self.frames_decoded = 0
        self.corrupt_packets = 0
        self._stream: av.VideoStream | None = None  # of the open container
        self._repairer: TimestampRepairer[Decoded] | None = None  # of the last connection
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the source and select its first video stream (nothing when it is open).

        Raises:
            SourceError: the source cannot be opened, is not a video FFmpeg can read, or has no
                video stream.
        """
        if self._closed:
            raise RuntimeError(f"video source {self.spec.display_name!r} is closed")
        if self._stream is not None:
            return
        name = self.spec.display_name
        if self.spec.kind == "file":
            _check_file(self.spec.url)
        if self.spec.kind == "webcam":
            check_device(self.spec.url)
        # FFmpeg's per-read timeout is half of ours: when a read times out, FFmpeg first
        # flushes its parser (handing out one more packet) and raises only when the next read
        # times out too, so a stall surfaces after two timeouts (measured with PyAV 18 /
        # FFmpeg 8 over RTSP: 2.0 s for a 1 s timeout).
        read_timeout = None if self.read_timeout_s is None else self.read_timeout_s / 2
        started = time.monotonic()
        try:
            container = av.open(
                self.spec.url,
                mode="r",
                format=self.spec.format,
                container_options=dict(self.spec.options),
                timeout=(self.open_timeout_s, read_timeout),
            )
        except (av.FFmpegError, OSError, ValueError) as error:
            if time.monotonic() - started >= self.open_timeout_s:
                # When the timeout interrupts it, FFmpeg reports whatever error the protocol
                # was left with (RTSP says "invalid data"), so the clock is the reliable sign.
                problem = f"no answer within the open timeout of {self.open_timeout_s:g} s"
                raise SourceStalled(f"cannot open video source {name!r}: {problem}") from None
            problem = redact(_open_problem(self.spec, error), self.spec.url)
            # An RTSP error reply a retry may get past: 5XX, or one FFmpeg has no code for.
            no_code = getattr(error, "errno", None) == errno.EPERM
            busy = self.spec.kind == "rtsp" and (
                isinstance(error, av.error.HTTPServerError) or no_code
            )
            # `from None` here and below: FFmpeg's exception text holds the URL, password
            # included, and a logged traceback would print it; the message says the problem.
            raise SourceError(f"cannot open video source {name!r}: {problem}", busy=busy) from None

        if not container.streams.video:
            found = ", ".join(f"{s.type} stream" for s in container.streams) or "no streams at all"
            container.close()
            raise SourceError(f"video source {name!r} has no video stream (found: {found})")
        self._stream = container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame + slice threads: else the decoder uses one core
        self._repairer = _repairer_for(self._stream, live=self.spec.is_live)

    @property
    def is_open(self) -> bool:
        return self._stream is not None

    def disconnect(self) -> None:
        """Release the container, keeping the counts: a later `open` connects anew."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.container.close()

    def close(self) -> None:
        """Release the container for good. Safe to call more than once."""
        self._closed = True
        self.disconnect()

    def __enter__(self) -> VideoSource:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- stream facts ------------------------------------------------------------------------

    def _opened(self) -> tuple[av.VideoStream, TimestampRepairer[Decoded]]:
        if self._stream is None or self._repairer is None:
            raise RuntimeError(f"video source {self.spec.display_name!r} is not open; call open()")
        return self._stream, self._repairer

    @property
    def width(self) -> int:
        """Frame width in pixels (after open)."""
        return self._opened()[0].codec_context.width

    @property
    def height(self) -> int:
        """Frame height in pixels (after open)."""
        return self._opened()[0].codec_context.height

    @property
    def average_rate(self) -> Fraction | None:
        """The container's average frame rate, None if unknown. Use pts for time, not this."""
        return self._opened()[0].average_rate

    @property
    def frame_count_hint(self) -> int | None:
        """How many frames this source will probably yield, for progress bars; None if unknown.

        The container's frame count when it stores one, else duration x average rate (an
        estimate for variable frame rate), capped by ``max_frames``.
        """
        stream = self._opened()[0]
        hint = stream.frames or None
        if hint is None and stream.average_rate:
            if stream.duration and stream.time_base:
                seconds = stream.duration * stream.time_base
            else:
                seconds = Fraction(stream.container.duration or 0, av.time_base)
            hint = round(seconds * stream.average_rate) or None
        if self.max_frames is not None:
            hint = min(hint or self.max_frames, self.max_frames)
        return hint

    @property
    def timestamp_report(self) -> dict[str, Any]:
        """What the timestamp repair changed so far: ``{"repaired_frames": n, "first_frame":
        index or None, "methods": {method: n}}`` with the methods of
        `pipeline.video.timestamps.REPAIR_METHODS` that were used (none when no pts was changed)."""
        if self._repairer is None:
            return {"repaired_frames": 0, "first_frame": None, "methods": {}}
        return self._repairer.report

    # -- decoding ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[DecodedFrame]:
        self.open()
        # Not one frame more is decoded than handed out: a fault after the last frame wanted
        # (which only the look-ahead would have seen) ends nothing.
        left = None if self.max_frames is None else max(0, self.max_frames - self.frames_decoded)
        return itertools.islice(self._repaired_frames(), left)

    def _repaired_frames(self) -> Iterator[DecodedFrame]:
        repairer = self._opened()[1]
        failure: SourceError | None = None
        try:
            for decoded in self._decoded_frames():
                frame = decoded[0]
                # PyAV >= 14 gives the frame's duration; the repairer ignores a missing one.
                duration = getattr(frame, "duration", None)
                repaired = repairer.push(decoded, pts=frame.pts, dts=frame.dts, duration=duration)
                if repaired is not None:  # once the look-ahead is full
                    yield self._to_decoded(repaired, repairer)
        except SourceError as error:
            failure = error  # raised once the good frames decoded before it are handed out
        for repaired in repairer.drain():
            yield self._to_decoded(repaired, repairer)
        if failure is not None:
            raise failure

    def _decoded_frames(self) -> Iterator[Decoded]:
        """Every decoded picture, still in the decoder's format, until the stream ends."""
        consecutive_errors = 0
        last_data = time.monotonic()
        while True:
            try:
                for packet in self._demux():
                    last_data = time.monotonic()
                    start = time.perf_counter()
                    try:
                        frames = packet.decode()
                    except av.FFmpegError as error:
                        consecutive_errors = self._count_corrupt(error, consecutive_errors)
                        continue
                    consecutive_errors = 0
                    decode_ms = (time.perf_counter() - start) * 1000
                    for frame in frames:
                        yield frame, decode_ms
                        decode_ms = 0.0  # a packet's decoding counts once, with its first frame
                return
            except av.FFmpegError as error:  # from the demuxer: decoding errors are counted above
                self._check_stall(error, last_data)
                if not isinstance(error, av.InvalidDataError):
                    raise SourceError(
                        f"reading video source {self.spec.display_name!r} failed: "
                        f"{redact(str(error), self.spec.url)}"
                    ) from None
                # Damaged container data. PyAV's demux generator ends at an error, so read on
                # with a new one: the demuxer continues after the bad bytes.
                consecutive_errors = self._count_corrupt(error, consecutive_errors)

    def _check_stall(self, error: Exception, last_data: float) -> None:
        """Raise SourceStalled when a read failed because the read timeout ran out.

        FFmpeg reports an interrupted read as whatever error the protocol was left with, so,
        as for the open, the clock since the last packet is the reliable sign."""
        if self.read_timeout_s is None:
            return
        silent = time.monotonic() - last_data
        # ExitError is FFmpeg's answer to the timeout's interrupt: nothing else raises it.
        if isinstance(error, av.ExitError) or silent >= 0.9 * self.read_timeout_s:
            raise SourceStalled(
                f"video source {self.spec.display_name!r} stalled: no data within the read "
                f"timeout of {self.read_timeout_s:g} s"
            ) from None

    def _demux(self) -> Iterator[av.Packet]:
        """The video stream's packets, ending with the empty packet that flushes the decoder
        (a method of its own: tests replace it to damage the container's data)."""
        stream = self._opened()[0]
        return stream.container.demux(stream)

    def _count_corrupt(self, error: Exception, consecutive_errors: int) -> int:
        """Count one corrupt packet; raise once too many came in a row."""
        self.corrupt_packets += 1
        consecutive_errors += 1
        if consecutive_errors >= self.max_consecutive_errors:
            raise SourceError(
                f"video source {self.spec.display_name!r}: {consecutive_errors} corrupt packets "
                f"in a row ({self.corrupt_packets} in total, {self.frames_decoded} frames "
                f"decoded); giving up. Last error: {redact(str(error), self.spec.url)}"
            ) from None
        return consecutive_errors

    def _to_decoded(
        self, repaired: RepairedTimestamp[Decoded], repairer: TimestampRepairer[Decoded]
    ) -> DecodedFrame:
        """The RGB frame with its repaired timestamp; logs the first repair of the connection
        (once: a broken file has the same fault in thousands of frames)."""
        start = time.perf_counter()
        frame, decode_ms = repaired.item
        # Converted per frame with the frame's own size: a file's parts may differ in size.
        image = np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
        time_base = frame.time_base or self._opened()[0].time_base or Fraction(0, 1)
        if repaired.index == repairer.first_repaired:
            log.warning(
                "%s: timestamps repaired from frame %d: %s",
                self.spec.display_name,
                self.frames_decoded,
                repaired.reason,
            )
        meta = FrameMeta(
            stream_id=self.stream_id,
            seq=self.frames_decoded,
            frame_index=self.frames_decoded,
            pts=repaired.pts,
            time_base=(time_base.numerator, time_base.denominator),
            capture_time=time.time(),
            source_pts=repaired.source_pts if repaired.repaired else None,
        )
        self.frames_decoded += 1
        return DecodedFrame(image, meta, decode_ms + (time.perf_counter() - start) * 1000)


def _repairer_for(stream: av.VideoStream, *, live: bool) -> TimestampRepairer[Decoded]:
    """A timestamp repairer in the stream's time base: a frame is one tick of the average
    rate (at least one tick), a discontinuity a jump back of more than `DISCONTINUITY_S` or
    `DISCONTINUITY_FRAMES` frames, whichever is less."""
    time_base = stream.time_base
    rate = stream.average_rate or stream.guessed_rate
    frame_duration = 1
    if time_base and rate:
        frame_duration = max(1, round(1 / (rate * time_base)))
    # Without a time base there are no seconds: count about a second of frames instead.
    ticks_per_second = math.ceil(1 / time_base) if time_base else 25 * frame_duration
    return TimestampRepairer(
        frame_duration=frame_duration,
        discontinuity_ticks=max(
            1, min(DISCONTINUITY_S * ticks_per_second, DISCONTINUITY_FRAMES * frame_duration)
        ),
        lookahead=0 if live else TIMESTAMP_LOOKAHEAD,
    )


def _check_file(path: str) -> None:
    """Problems with a file that FFmpeg would only report as a bare errno."""
    if not os.path.exists(path):
        raise SourceError(f"cannot open video file {path!r}: it does not exist")
    if os.path.isdir(path):
        raise SourceError(f"cannot open video file {path!r}: it is a directory")
    if os.path.getsize(path) == 0:
        raise SourceError(f"cannot open video file {path!r}: the file is empty (0 bytes)")


def check_device(path: str) -> None:
    """A missing webcam, named with the devices that do exist (FFmpeg says only ENOENT)."""
    if os.path.exists(path):
        return
    found = sorted(glob.glob("/dev/video*"))
    have = ", ".join(found) if found else "none: no camera connected, or its driver not loaded"
    raise SourceError(f"webcam {path!r} does not exist (video devices here: {have})")


def _open_problem(spec: SourceSpec, error: Exception) -> str:
    """A sentence saying why ``av.open`` failed, more useful than FFmpeg's errno text."""
    code = getattr(error, "errno", None)
    if spec.kind == "webcam" and code == errno.EBUSY:
        return f"the device is busy: another program is using it ({error})"
    if spec.kind == "webcam" and code in (errno.EACCES, errno.EPERM):
        return f"permission denied: add the user to the 'video' group ({error})"
    if spec.kind == "webcam" and code in (errno.ENODEV, errno.ENXIO, errno.ENOTTY):
        return f"not a working video capture device ({error})"
    if spec.kind == "rtsp":
        for kind, problem in _RTSP_PROBLEMS:
            if isinstance(error, kind):
                return f"{problem} ({error})"
        if code == errno.EPERM:  # what FFmpeg makes of an error reply it has no code for
            return f"the server refused the request (an RTSP error reply) ({error})"
    if isinstance(error, av.InvalidDataError):
        if spec.kind == "file" and _mp4_without_moov(spec.url):
            return (
                "MP4 'moov atom not found': the file is truncated or was never finalised "
                "(its writer was stopped before closing it); re-record or re-copy it"
            )
        return f"not a video FFmpeg can read, or its header is corrupt ({error})"
    if isinstance(error, av.error.FileNotFoundError):
        return f"no such file or device ({error})"
    if isinstance(error, av.error.PermissionError):
        return f"permission denied ({error})"
    return str(error)


def _mp4_without_moov(path: str) -> bool:
    """True when ``path`` starts like an MP4/MOV file but has no top-level 'moov' box.

    That is the signature of a recording cut short: the sample tables ('moov') are written
    last, so a truncated file has the media data but no index to it.
    """
    boxes: list[bytes] = []  # the types of the top-level boxes, in order
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            offset = 0
            while offset + 8 <= size:
                file.seek(offset)
                box_size, box_type = struct.unpack(">I4s", file.read(8))
                boxes.append(box_type)
                if box_size == 1:  # 64-bit size follows the type
                    (box_size,) = struct.unpack(">Q", file.read(8))
                if box_size < 8:  # 0: the box runs to the end of the file; else a corrupt size
                    break
                offset += box_size
    except (OSError, struct.error):  # unreadable, or a 64-bit size cut off
        return False
    mp4_start = (b"ftyp", b"free", b"wide", b"mdat", b"skip")
    return bool(boxes) and boxes[0] in mp4_start and b"moov" not in boxes
