"""Decoder node: frames from a file, FFmpeg test source (and later RTSP / webcam) via PyAV."""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipeline.config import DecoderConfig
from pipeline.messages import EndOfStream, FrameMessage, FrameMeta, Message
from pipeline.runtime import Node
from pipeline.sources import VideoSource, parse_source


class DecoderNode(Node):
    """Source node: one FrameMessage per decoded frame, then an EndOfStream with the count."""

    name = "decoder"
    has_input = False

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.source: VideoSource | None = None

    def setup(self) -> None:
        if not self.config.source:
            raise ValueError("decoder.source is empty: give --source VIDEO")
        self.source = VideoSource(
            parse_source(self.config.source),
            max_frames=self.config.max_frames,
            max_consecutive_errors=self.config.max_consecutive_errors,
            open_timeout_s=self.config.open_timeout_s,
        )
        self.source.open()
        rate = self.source.average_rate
        self.detail.update(
            source=self.source.spec.display_name,
            width=self.source.width,
            height=self.source.height,
            fps=float(rate) if rate else None,
            frame_count_hint=self.source.frame_count_hint,
        )

    def produce(self) -> Iterator[Message]:
        if self.source is None:
            raise RuntimeError("DecoderNode.setup() must run before produce()")
        seq = 0
        frames = iter(self.source)
        while True:
            start = time.perf_counter()
            decoded = next(frames, None)
            if decoded is None:
                break
            self.durations_ms.append((time.perf_counter() - start) * 1000)
            meta = FrameMeta(
                stream_id=self.config.stream_id,
                seq=seq,
                frame_index=decoded.index,
                pts=decoded.pts,
                time_base=decoded.time_base,
                capture_time=decoded.capture_time,
            )
            yield FrameMessage(meta=meta, image=decoded.image)
            seq += 1
            self.counters["frames"] = seq
            self.counters["corrupt_packets"] = self.source.corrupt_packets
        limit = self.config.max_frames
        reason = "max_frames" if limit is not None and seq >= limit else "eof"
        self.source.close()
        yield EndOfStream(stream_id=self.config.stream_id, frames=seq, reason=reason)

    def abort(self) -> None:
        if self.source is not None:
            self.source.close()
