"""Publisher node: masks out to subscribers (PUB) and to disk (PNG, JSON lines, MOT, overlay)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from pipeline.config import PublisherConfig
from pipeline.live import FrameTimings
from pipeline.messages import EndOfStream, MaskMessage, Message
from pipeline.outputs import MaskWriter
from pipeline.runtime import Node

log = logging.getLogger(__name__)


class PublisherNode(Node):
    """MaskMessage -> the PUB socket (without the frame image) and the file outputs.

    The runtime publishes what `process` returns; the files are written here. Each published
    message carries the frame's stage times plus "publish" and "latency" (capture to
    publish); the status holds them against the per-frame budget.
    """

    name = "publisher"

    def __init__(self, config: PublisherConfig, *, budget_ms: float, live: bool = False) -> None:
        super().__init__()
        self.config = config
        self.live = live
        self.timings = FrameTimings(budget_ms)
        self.writer: MaskWriter | None = None

    def setup(self) -> None:
        if self.config.out:
            self.writer = MaskWriter(
                Path(self.config.out),
                write_png=self.config.png,
                write_jsonl=self.config.jsonl,
                write_mot=self.config.mot,
                write_overlay=self.config.overlay,
            )

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, MaskMessage):
            self.count("unexpected_messages")
            return []
        start = time.perf_counter()
        if self.writer is not None:
            self.writer.write(
                frame_index=msg.meta.frame_index,
                seq=msg.meta.seq,
                pts=msg.meta.pts,
                time_base=msg.meta.time_base,
                frame_size=msg.frame_size,
                tracks=msg.tracks,
                masks=msg.masks,
                image=msg.image,
            )
        self.count("frames")
        timings = {
            **msg.timings,
            "publish": (time.perf_counter() - start) * 1000,
            "latency": (time.time() - msg.meta.capture_time) * 1000,
        }
        if self.timings.add(timings) > self.timings.budget_ms:
            self.count("over_budget")
        # Consumers get masks and metadata; the frame itself stays here (megabytes each).
        return [dataclasses.replace(msg, image=None, timings=timings)]

    def before_status(self) -> None:
        interval = self.timings.interval()
        # Live: say so when frames went over budget since the last status.
        self.state = "over_budget" if self.live and interval["over_budget"] else "running"
        self.detail["interval"] = interval
        self.detail["timings"] = self.timings.summary()

    def finish(self, end: EndOfStream) -> list[Message]:
        if self.writer is not None:
            written = self.writer.close()
            self.detail["outputs"] = {kind: str(path) for kind, path in written.items()}
        self.detail["frames_expected"] = end.frames
        return [end]

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def stopped(self) -> None:
        """A live run ends with a signal as a rule: keep what it wrote. (An offline run
        stopped half-way leaves nothing under the final names: it is a failed job.)"""
        if not self.live or self.writer is None:
            self.abort()
            return
        try:
            written = self.writer.close()
        except Exception:
            log.exception("publisher: the outputs could not be finished; removing them")
            self.abort()
            return
        self.detail["outputs"] = {kind: str(path) for kind, path in written.items()}
