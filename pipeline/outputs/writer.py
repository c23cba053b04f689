"""`MaskWriter`: the file outputs of a run, one sink per format, driven frame by frame.

The publisher node makes one for its ``out`` directory with the formats its config asks for
(and, for a resumed run, the number of frames already complete there), gives it each
MaskMessage, and commits it at the end (``discard`` on a failure).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from pipeline.outputs.atomic import AllOrNothing
from pipeline.outputs.sinks import JsonLinesSink, MotSink, OverlaySink, PngSink, Sink
from pipeline.wire.messages import MaskMessage


class MaskWriter(AllOrNothing):
    """Writes the file outputs of a run, frame by frame, in the order frames are given.

    Usage::

        with MaskWriter(out_dir, overlay_fps=Fraction(25)) as writer:
            for msg in masks:
                writer.write(msg)
        # on success the files are in place; on an exception nothing is left under final names

    ``sinks``: the sinks by the kind of output they make, as in ``commit()``'s result:
    "jsonl", "mot", "masks" (the PNG directory), "overlay". ``overlay_fps`` only times the
    overlay frames that have no pts (`OverlaySink`).
    """

    def __init__(
        self,
        out_dir: str | Path,
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
        if resume_frames < 0:
            raise ValueError(f"resume_frames must be >= 0, got {resume_frames}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.first_frame = resume_frames  # the index the next write() must have at least
        self.frames_written = resume_frames  # an interrupted run's frames count as written
        self.sinks: dict[str, Sink] = {}
        self._state = "open"  # -> "committed" | "discarded"
        self._result: dict[str, Path] = {}
        try:
            # In this order, so that a resume that cannot be done says first what it lacks
            # of the JSON lines (which tell which frames are there).
            if write_jsonl:
                self.sinks["jsonl"] = JsonLinesSink(self.out_dir, resume_frames)
            if write_mot:
                self.sinks["mot"] = MotSink(self.out_dir, resume_frames)
            if write_png:
                self.sinks["masks"] = PngSink(self.out_dir, resume_frames)
            if write_overlay:
                self.sinks["overlay"] = OverlaySink(self.out_dir, resume_frames, overlay_fps)
        except BaseException:
            self.discard()
            raise

    def write(self, msg: MaskMessage) -> None:
        """Write one frame's outputs: the PNG is named by ``msg.meta.frame_index``, the
        overlay needs ``msg.image``. Every sink checks the frame before any writes it, so a
        ValueError leaves the outputs as they were."""
        if self._state != "open":
            raise RuntimeError(f"MaskWriter is {self._state}; create a new one")
        index, (num, den) = msg.meta.frame_index, msg.meta.time_base
        if index < 0:
            raise ValueError(f"bad frame_index {index}: frames are numbered from 0")
        if index < self.first_frame:
            raise ValueError(
                f"frame {index} is before frame {self.first_frame}, where these outputs "
                "continue an interrupted run"
            )
        if den <= 0 or num <= 0:
            raise ValueError(f"time_base must be two positive ints (num, den), got {(num, den)}")
        for sink in self.sinks.values():
            sink.check(msg)
        for sink in self.sinks.values():
            sink.write(msg)
        self.frames_written += 1

    def commit(self) -> dict[str, Path]:
        """Finish every output and move it into place; return ``{kind: final path}``.

        The overlay and the PNG directory only when at least one frame was written (or
        carried on). Calling commit again returns the same dict.
        """
        if self._state == "discarded":
            raise RuntimeError("MaskWriter was discarded; nothing was written")
        if self._state == "open":
            try:
                # Finish everything that can fail first; the renames come last and are atomic.
                for sink in self.sinks.values():
                    sink.finish()
            except BaseException:
                self.discard()
                raise
            committed = {kind: sink.commit() for kind, sink in self.sinks.items()}
            self._result = {kind: path for kind, path in committed.items() if path is not None}
            self._state = "committed"
        return dict(self._result)

    def discard(self) -> None:
        """Discard everything: temporaries and the PNGs this writer already moved into place.

        Does nothing after commit() (the outputs are complete) or a previous discard().
        """
        if self._state != "open":
            return
        self._state = "discarded"
        for sink in self.sinks.values():
            sink.discard()
