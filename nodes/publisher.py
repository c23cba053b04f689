"""Publisher node: masks out to subscribers (PUB) and to disk (PNG, JSON lines, MOT, overlay)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import PublisherConfig
from pipeline.messages import EndOfStream, MaskMessage, Message
from pipeline.outputs import MaskWriter
from pipeline.runtime import Node


class PublisherNode(Node):
    """MaskMessage -> the PUB socket (without the frame image) and the file outputs.

    The runtime publishes what `process` returns; the files are written here.
    """

    name = "publisher"

    def __init__(self, config: PublisherConfig) -> None:
        super().__init__()
        self.config = config
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
        # Consumers get masks and metadata; the frame itself stays here (megabytes each).
        return [dataclasses.replace(msg, image=None)]

    def finish(self, end: EndOfStream) -> list[Message]:
        if self.writer is not None:
            written = self.writer.close()
            self.detail["outputs"] = {kind: str(path) for kind, path in written.items()}
        self.detail["frames_expected"] = end.frames
        return [end]

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
