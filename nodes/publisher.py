"""Publisher node: masks out to subscribers (PUB) and to disk (PNG, JSON lines, MOT, overlay)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec

from pipeline.config import PublisherConfig, RunConfig
from pipeline.outputs.sinks import OverlaySink
from pipeline.outputs.writer import MaskWriter
from pipeline.run import resume
from pipeline.run.handoff import NodeRuntime
from pipeline.run.live import FrameTimings, is_live
from pipeline.run.runtime import Node, shutdown_deferred
from pipeline.wire.messages import EndOfStream, MaskMessage, Message

log = logging.getLogger(__name__)


class PublisherNode(Node):
    """MaskMessage -> the PUB socket (without the frame image) and the file outputs.

    The runtime publishes what `process` returns; the files are written here. Each published
    message carries the frame's stage times plus "publish" and "latency" (capture to
    publish); the status holds them against the per-frame budget.
    """

    name = "publisher"
    inputs = (MaskMessage,)
    outputs = (MaskMessage,)

    @classmethod
    def from_config(cls, config: RunConfig, runtime: NodeRuntime) -> PublisherNode:
        if config.live.budget_ms is None:  # resolve_run_config always sets it
            raise RuntimeError("live.budget_ms was not resolved")
        return cls(
            config.publisher,
            budget_ms=config.live.budget_ms,
            live=is_live(config),
            resume_frames=runtime.frames_done,
        )

    def __init__(
        self,
        config: PublisherConfig,
        *,
        budget_ms: float,
        live: bool = False,
        resume_frames: int = 0,
    ) -> None:
        """``resume_frames``: the outputs in ``config.out`` already hold this many complete
        frames of an interrupted run; they are continued, and earlier frames are skipped."""
        super().__init__()
        self.config = config
        self.live = live
        self.resume_frames = resume_frames
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
                resume_frames=self.resume_frames,
            )
        if self.resume_frames:
            self.counters["frames_resumed"] = self.resume_frames

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, MaskMessage):  # the runtime passes only MaskMessage
            raise TypeError(f"publisher takes MaskMessage, not {type(msg).__name__}")
        if msg.meta.frame_index < self.resume_frames:
            # A resumed run whose tracker restarted before the frames already written: they
            # were written (and published) by the interrupted run.
            self.count("frames_skipped")
            return []
        start = time.perf_counter()
        if self.writer is not None:
            # One frame's files are written whole or not at all: a stop waits for them.
            with shutdown_deferred():
                self.writer.write(msg)
        self.count("frames")
        timings = {
            **msg.timings,
            "publish": (time.perf_counter() - start) * 1000,
            "latency": (time.time() - msg.meta.capture_time) * 1000,
        }
        if self.timings.add(timings) > self.timings.budget_ms:
            self.count("over_budget")
        # Consumers get masks and metadata; the frame itself stays here (megabytes each).
        return [msgspec.structs.replace(msg, image=None, timings=timings)]

    def before_status(self) -> None:
        interval = self.timings.interval()
        # Live: say so when frames went over budget since the last status.
        self.state = "over_budget" if self.live and interval["over_budget"] else "running"
        self.detail["interval"] = interval
        self.detail["timings"] = self.timings.summary()

    def _finished_outputs(self) -> None:
        if self.writer is not None:
            self.detail["outputs"] = {
                kind: str(path) for kind, path in self.writer.commit().items()
            }
            overlay = self.writer.sinks.get("overlay")
            rescaled = overlay.rescaled_frames if isinstance(overlay, OverlaySink) else 0
            self.detail["overlay_rescaled_frames"] = rescaled

    def finish(self, end: EndOfStream) -> list[Message]:
        self._finished_outputs()
        if self.config.out:
            resume.forget_run(self.config.out)
        self.detail["frames_expected"] = end.frames
        return [end]

    def abort(self) -> None:
        """A failed run: nothing of it stays under a final name (a resumed run's earlier
        frames stay as they were, and can still be resumed)."""
        if self.writer is None:
            return
        self.writer.discard()
        if self.live or not self.config.out:
            return
        if self.resume_frames:
            resume.mark_interrupted(self.config.out, self.resume_frames)
        else:
            resume.forget_run(self.config.out)

    def stopped(self) -> None:
        """Stopped by a signal (Ctrl-C, SIGTERM): keep every frame that was written, as
        complete files: a live run ends this way as a rule, and an offline run can be
        continued from there with ``samstream run --resume``."""
        if self.writer is None:
            return
        try:
            self._finished_outputs()
        except Exception:
            log.exception("publisher: the outputs could not be finished; removing them")
            self.abort()
            return
        if not self.live:
            frames = self.writer.frames_written
            resume.mark_interrupted(self.config.out, frames)
            self.detail["interrupted_at"] = frames
