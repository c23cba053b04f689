"""A camera that comes back: RTSP and webcam reading with stall detection and reconnects.

A live source fails in two ways that a file never does: it *drops* (the server goes away,
the cable is pulled: the read ends or errors) and it *stalls* (the connection stays up but no
data comes: only the read timeout notices). Either way `LiveSource` closes the container,
reports the state, and reconnects with capped exponential back-off until the source is back
(or ``give_up_after_s`` has passed). The reading runs in a thread of its own; whoever
iterates gets a ``None`` tick whenever no frame came for a moment (a stall, an outage), so
the node around it keeps sending heartbeats and notices a stop.

The first open is not retried (except a few times when the server answers with an error,
as a busy one does): a wrong URL or a missing device should fail the run at once with a
clear error, not retry silently forever.

Timestamps start at 0 and stay monotonic across reconnects: a new connection's pts restart
(RTSP starts each session near 0), so each session is rebased to continue from the previous
frame's pts plus the wall-clock time in between (the time the source was down).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from fractions import Fraction

import msgspec

from pipeline.config import DecoderConfig
from pipeline.video.sources import (
    DecodedFrame,
    SourceError,
    SourceSpec,
    SourceStalled,
    VideoSource,
    parse_source,
)
from pipeline.video.timestamps import Timeline
from pipeline.wire.messages import SourceState

log = logging.getLogger(__name__)

TICK_S = 0.1  # longest wait for a frame before the iterating thread gets a None tick
QUEUE_FRAMES = 8  # frames the reader thread may be ahead of the iterating one
FIRST_OPEN_ATTEMPTS = 3  # for a server that answers "not now" to the very first request


@dataclass(frozen=True)
class SourceEvent:
    """A change in a live source's state, for status messages.

    state: one of SOURCE_STATES (`pipeline.wire.messages`): "connected", "stalled"
        (connected but silent past the read timeout), "lost" (the stream ended or failed) or
        "reconnecting" (waiting to try again).
    session: connection number (0 for the first connection, +1 per reconnect).
    attempt: reconnect attempts so far in this outage (0 when connected).
    next_try_in_s: seconds to the next attempt ("reconnecting" only).
    down_s: seconds since the last frame before the outage (0 when connected).
    error: what went wrong, credentials masked.
    """

    state: SourceState
    session: int
    attempt: int = 0
    next_try_in_s: float | None = None
    down_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        # Every field in declaration order (the keys status messages have), down_s rounded.
        return {**asdict(self), "down_s": round(self.down_s, 3)}


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnect attempts: ``initial_s``, doubling, capped at ``max_s``."""

    initial_s: float = 0.5
    max_s: float = 2.0

    def delay(self, attempt: int) -> float:
        """Wait before attempt ``attempt`` (1-based)."""
        # Exponent capped: 2 ** 1024 no longer converts to a float (an outage of ~35 min).
        return min(self.max_s, self.initial_s * 2 ** min(attempt - 1, 1000))


# What the reader thread hands over: a frame, an event, or the error the source gave up with.
ReaderItem = DecodedFrame | SourceEvent | Exception


class LiveSource:
    """Reads a live source forever: yields DecodedFrame, or None for a `TICK_S` without one.

    Every connection is one `VideoSource`, opened again after a drop: frame indices and the
    corrupt packet count go on over connections, and each connection's pts are one piece of a
    `Timeline` (in the first frame's time base), ``session`` its connection number.
    ``on_event`` is called at every state change, in the thread that iterates. Raises
    SourceError when the first open fails, or when the source has been gone for
    ``give_up_after_s``.

    The source is read in a thread of its own: FFmpeg blocks in a read until data comes or
    the read timeout passes, and Python runs signal handlers only between its own
    instructions, so a decoder reading a stalled camera in its main thread heard SIGTERM only
    seconds later (after 2.4 s the launcher killed it). The iterating thread waits on a
    queue, a tick at a time, so it stops at once; the reader thread closes the source when
    its read returns.
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        stream_id: str = "cam0",
        open_timeout_s: float,
        read_timeout_s: float,
        backoff: Backoff,
        give_up_after_s: float | None = None,
        max_consecutive_errors: int = 50,
        on_event: Callable[[SourceEvent], None] | None = None,
    ) -> None:
        self.spec = spec
        self.source = VideoSource(
            spec,
            stream_id=stream_id,
            max_consecutive_errors=max_consecutive_errors,
            open_timeout_s=open_timeout_s,
            read_timeout_s=read_timeout_s,
        )
        self.backoff = backoff
        self.give_up_after_s = give_up_after_s
        self.on_event = on_event or (lambda event: None)
        self.session = 0  # the connection number: reconnects so far
        self._timeline = Timeline()
        self._queue: queue.Queue[ReaderItem] = queue.Queue(maxsize=QUEUE_FRAMES)
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None

    def open(self) -> VideoSource:
        """The first connection; its failure is the caller's error, not a reconnect.

        Only a server that answered with an error (it may be busy: GStreamer's RTSP server
        replies 503 while it prepares a stream under load) gets ``FIRST_OPEN_ATTEMPTS``
        tries; a refused connection, a silent server or a missing device fail at once."""
        attempt = 0
        while not self.source.is_open:
            attempt += 1
            try:
                self.source.open()
            except SourceError as error:
                if not error.busy or attempt >= FIRST_OPEN_ATTEMPTS:
                    raise
                log.info("%s: %s; trying again", self.spec.display_name, error)
                time.sleep(self.backoff.delay(attempt))
                continue
            self.on_event(SourceEvent("connected", session=0))
        return self.source

    def close(self) -> None:
        """Stop reading; a reader thread closes the source once its current read returns."""
        self._closing.set()
        if self._reader is None:
            self.source.close()

    @property
    def reading(self) -> bool:
        """The reader thread is still going (once it ends, the source is closed)."""
        return self._reader is not None and self._reader.is_alive()

    @property
    def corrupt_packets(self) -> int:
        """Damaged packets skipped over all connections."""
        return self.source.corrupt_packets

    def __iter__(self) -> Iterator[DecodedFrame | None]:
        self.open()
        self._reader = threading.Thread(target=self._read, name="samstream-camera", daemon=True)
        self._reader.start()
        while not self._closing.is_set():
            try:
                item = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, Exception):
                raise item
            if isinstance(item, SourceEvent):
                self.on_event(item)
                yield None
            else:
                yield item

    def _put(self, item: ReaderItem) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=TICK_S)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        """The reader thread: connection after connection, until closed or given up."""
        try:
            while not self._closing.is_set():
                self._read_connection()
        except Exception as error:  # the source gave up: the iterating thread raises it
            self._put(error)
        finally:
            self.source.close()  # here, never while this thread may be inside a read

    def _read_connection(self) -> None:
        """The open connection's frames until it drops or stalls, then the reconnect."""
        last_frame = time.monotonic()
        try:
            for frame in self.source:
                if self._closing.is_set():
                    return
                last_frame = time.monotonic()
                self._put(self._stamp(frame))
            error, state = "the stream ended (the server closed it)", "lost"
        except SourceStalled as stall:
            error, state = str(stall), "stalled"
        except SourceError as failure:
            error, state = str(failure), "lost"
        if self._closing.is_set():
            return
        self.source.disconnect()
        log.warning("%s: %s", self.spec.display_name, error)
        down_s = time.monotonic() - last_frame
        self._put(SourceEvent(state, self.session, down_s=down_s, error=error))
        self._reconnect(last_frame, error)

    def _reconnect(self, down_since: float, error: str) -> None:
        """Try again with back-off until a connection opens (or the source is closed)."""
        attempt = 0
        while not self._closing.is_set():
            attempt += 1
            delay = self.backoff.delay(attempt)
            down_s = time.monotonic() - down_since
            if self.give_up_after_s is not None:
                if down_s >= self.give_up_after_s:
                    raise SourceError(
                        f"video source {self.spec.display_name!r} has been gone for "
                        f"{down_s:.1f} s (give_up_after_s {self.give_up_after_s:g}); "
                        f"last error: {error}"
                    )
                delay = min(delay, self.give_up_after_s - down_s)  # a last try at the limit
            self._put(
                SourceEvent(
                    "reconnecting",
                    self.session,
                    attempt=attempt,
                    next_try_in_s=round(delay, 3),
                    down_s=down_s,
                    error=error,
                )
            )
            if self._closing.wait(delay):
                return
            try:
                self.source.open()
            except SourceError as failure:
                error = str(failure)
                log.info(
                    "%s: reconnect attempt %d failed: %s", self.spec.display_name, attempt, error
                )
                continue
            self.session += 1
            self._timeline.new_piece()  # the new connection's pts restart
            down_s = time.monotonic() - down_since
            log.info(
                "%s: reconnected after %.1f s (attempt %d)", self.spec.display_name, down_s, attempt
            )
            self._put(SourceEvent("connected", self.session, attempt=attempt, down_s=down_s))
            return

    def _stamp(self, frame: DecodedFrame) -> DecodedFrame:
        """The frame on the live timeline, with its session. A source without a time base
        has no time to rebase: its frames go without pts."""
        meta = frame.meta
        time_base = base = Fraction(*meta.time_base)
        pts = None
        if meta.pts is not None and time_base:
            pts = self._timeline.place(meta.pts, time_base, meta.capture_time)
            base = self._timeline.time_base or time_base
        time_base_pair = (base.numerator, base.denominator)
        meta = msgspec.structs.replace(
            meta, pts=pts, time_base=time_base_pair, session=self.session
        )
        return replace(frame, meta=meta)


def spec_for(config: DecoderConfig) -> SourceSpec:
    """The parsed source with the FFmpeg options the config asks for its kind."""
    spec = parse_source(config.source)
    if spec.kind == "rtsp":
        options = {"rtsp_transport": config.rtsp_transport}
    elif spec.kind == "webcam":
        wanted = {
            "video_size": config.video_size,
            "framerate": None if config.framerate is None else f"{config.framerate:g}",
            "input_format": config.pixel_format,  # V4L2's name for the pixel format
        }
        options = {key: value for key, value in wanted.items() if value is not None}
    else:
        return spec
    return replace(spec, options={**spec.options, **options})
