"""Decoder node: frames from files, FFmpeg test sources, RTSP cameras and webcams via PyAV."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace

import msgspec

from pipeline.config import DecoderConfig, RunConfig
from pipeline.run.handoff import NodeRuntime
from pipeline.run.live import is_live
from pipeline.run.runtime import Node
from pipeline.run.stream_position import Continuation, PositionFile
from pipeline.video.live_source import Backoff, LiveSource, SourceEvent, spec_for
from pipeline.video.sources import DecodedFrame, VideoSource
from pipeline.wire.messages import EndOfStream, FrameMessage, Message

log = logging.getLogger(__name__)


class DecoderNode(Node):
    """Source node: one FrameMessage per decoded frame, then an EndOfStream with the count.

    Live mode: a camera is read as fast as it sends (the links downstream keep only the
    newest frame) and reconnected when it drops or stalls; a file or test source is played
    at its own frame rate, as a camera would deliver it.

    Each frame's ``pts`` is the source's repaired, strictly increasing timestamp, and its
    ``source_pts`` the container's where the repair changed it. For a file or test source
    ``detail["timestamps"]`` holds `VideoSource.timestamp_report` and
    ``counters["timestamps_repaired"]`` its count of repaired frames.
    """

    name = "decoder"
    outputs = (FrameMessage,)

    @classmethod
    def from_config(cls, config: RunConfig, runtime: NodeRuntime) -> DecoderNode:
        # A resumed run starts after the frame of the tracker's snapshot.
        after = runtime.tracker_frame
        return cls(
            config.decoder,
            live=is_live(config),
            start_frame=0 if after is None else after + 1,
            position_file=runtime.state_path("decoder.position"),
        )

    def __init__(
        self,
        config: DecoderConfig,
        *,
        live: bool = False,
        start_frame: int = 0,
        position_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """``start_frame``: frames before it are decoded but not sent (a resumed run); frame
        indices, sequence numbers and timestamps stay those of a run from the first frame.
        ``position_file`` (live runs under the launcher): where the stream's position is
        kept after every frame, and continued from when a previous decoder left one."""
        super().__init__()
        self.config = config
        self.live = live
        self.start_frame = start_frame
        self.source: VideoSource | LiveSource | None = None
        self.position = PositionFile(position_file) if live and position_file else None
        self.continuation: Continuation | None = None

    def setup(self) -> None:
        if not self.config.source:
            raise ValueError("decoder.source is empty: give --source VIDEO")
        after = self.position.read(self.config.stream_id) if self.position is not None else None
        if after is not None:
            # A decoder of this run died: the stream goes on from its last frame.
            self.continuation = Continuation(after)
            self.detail["continued_at_seq"] = after.seq + 1
            log.warning(
                "decoder: continuing the stream after a restart at seq %d, frame %d",
                after.seq + 1,
                after.frame_index + 1,
            )
        spec = spec_for(self.config)
        if spec.is_live:
            live = LiveSource(
                spec,
                stream_id=self.config.stream_id,
                open_timeout_s=self.config.open_timeout_s,
                read_timeout_s=self.config.read_timeout_s,
                backoff=Backoff(self.config.reconnect_initial_s, self.config.reconnect_max_s),
                give_up_after_s=self.config.give_up_after_s,
                max_consecutive_errors=self.config.max_consecutive_errors,
                on_event=self._on_source_event,
            )
            opened = live.open()
            self.source = live
        else:
            opened = VideoSource(
                spec,
                stream_id=self.config.stream_id,
                max_frames=self.config.max_frames,
                max_consecutive_errors=self.config.max_consecutive_errors,
                open_timeout_s=self.config.open_timeout_s,
            )
            opened.open()
            self.source = opened
        rate = opened.average_rate
        self.detail.update(
            source=spec.display_name,
            kind=spec.kind,
            width=opened.width,
            height=opened.height,
            fps=float(rate) if rate else None,
            frame_count_hint=None if spec.is_live else opened.frame_count_hint,
        )

    def _on_source_event(self, event: SourceEvent) -> None:
        # A connected source is a running decoder; its outages are status states of their own.
        self.state = "running" if event.state == "connected" else event.state
        self.detail["source_state"] = event.to_json()
        if event.state == "reconnecting":
            self.count("reconnect_attempts")
        if event.state == "connected" and event.session > 0:
            self.count("reconnects")
        if event.state in ("stalled", "lost"):
            self.count(f"source_{event.state}")
        self.notify()

    def _frames(self) -> Iterator[DecodedFrame | None]:
        """Decoded frames (None: an idle tick), paced in real time for a file played live."""
        if self.source is None:
            raise RuntimeError("DecoderNode.setup() must run before produce()")
        if isinstance(self.source, LiveSource) or not self.live:
            yield from self.source
            return
        start: float | None = None
        first_seconds = 0.0
        for frame in self.source:
            if (seconds := frame.meta.time_seconds) is not None:
                if start is None:
                    start, first_seconds = time.monotonic(), seconds
                due = start + seconds - first_seconds
                while (left := due - time.monotonic()) > 0:
                    time.sleep(min(0.05, left))
                    yield None
            # Stamped now, as a camera would: capture-to-publish latency starts here.
            yield replace(frame, meta=msgspec.structs.replace(frame.meta, capture_time=time.time()))

    def produce(self) -> Iterator[Message | None]:
        seq = self.start_frame
        frames = seq  # the stream's frame count so far (continued after a restart)
        for decoded in self._frames():
            if decoded is None:
                yield None
                continue
            if decoded.meta.frame_index < self.start_frame:
                # Decoded all the same: the timestamp repair must see every frame to give
                # the same timeline as a run from the start.
                self.count("frames_skipped")
                continue
            self.durations_ms.append(decoded.decode_ms)
            meta = decoded.meta  # its seq is its frame index: frames before start_frame count
            if self.continuation is not None:
                meta = self.continuation.apply(meta)
            if self.position is not None:
                # Before the send: a death in between leaves a gap, never a repeat.
                self.position.write(meta)
            frames = meta.seq + 1
            yield FrameMessage(
                meta=meta, image=decoded.image, timings={"decode": decoded.decode_ms}
            )
            seq += 1
            self.counters["frames"] = seq - self.start_frame
            self.counters["corrupt_packets"] = self.source.corrupt_packets
            self._note_timestamps()
            if self.config.max_frames is not None and seq >= self.config.max_frames:
                break
        limit = self.config.max_frames
        reason = "max_frames" if limit is not None and seq >= limit else "eof"
        self._note_timestamps()
        self.close_source()
        yield EndOfStream(stream_id=self.config.stream_id, frames=frames, reason=reason)

    def _note_timestamps(self) -> None:
        """The source's timestamp repairs so far, for the run summary. Only a `VideoSource`
        reports them: a camera's frames are restamped on its own clock by `LiveSource`."""
        if not isinstance(self.source, VideoSource):
            return
        report = self.source.timestamp_report
        self.counters["timestamps_repaired"] = report["repaired_frames"]
        self.detail["timestamps"] = report

    def abort(self) -> None:
        self.close_source()  # a decoder has no outputs of its own to drop

    def close_source(self) -> None:
        """Release the source and the position file: at the stream's end, or stopped."""
        if self.position is not None:
            self.position.close()
        if self.source is not None:
            self.source.close()
