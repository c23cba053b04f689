"""Tracker node: carries each object's prompt from frame to frame and runs the mask decoder."""

from __future__ import annotations

import logging
import time
from collections import deque

from pipeline import resume
from pipeline.config import TrackerConfig
from pipeline.embedding_codec import embedding_from_wire
from pipeline.mask_decoder import SamMaskDecoder
from pipeline.messages import (
    EmbeddingMessage,
    MaskMessage,
    Message,
    PromptCommand,
    PromptReply,
    TrackRecord,
)
from pipeline.predictor import SAM, ImageEmbedding
from pipeline.runtime import Node
from pipeline.tracking import (
    PromptTracker,
    TrackerSettings,
    TrackOutput,
)

log = logging.getLogger(__name__)

# Tracker states kept for --resume, one per frame: more than can be in flight between the
# tracker and the publisher (their queues hold 2 x transport.hwm), so the state after the
# publisher's last frame is among them. Small: a track's filter and its low-res logits.
SNAPSHOTS_KEPT = 64


class TrackerNode(Node):
    """EmbeddingMessage -> MaskMessage (every track's mask, box, score, state, health)."""

    name = "tracker"

    def __init__(
        self,
        config: TrackerConfig,
        *,
        weights: str,
        image_size: int,
        resume_dir: str | None = None,
        resume_from: int | None = None,
    ) -> None:
        """``resume_dir``: an offline run's output directory, where the tracker's states
        after its last frames are saved when it is stopped (for ``--resume``);
        ``resume_from``: start from the state saved there after that frame, not afresh."""
        super().__init__()
        self.config = config
        self.weights = weights
        self.image_size = image_size
        self.resume_dir = resume_dir
        self.resume_from = resume_from
        self.decoder: SamMaskDecoder | None = None
        self.tracker: PromptTracker | None = None
        self._last_session: int | None = None
        self._last_capture = 0.0
        # The states after the last frames (a frame is in flight to the publisher for a
        # while: the one after its last written frame is among them).
        self._snapshots: deque[tuple[int, resume.Snapshot]] = deque(maxlen=SNAPSHOTS_KEPT)

    def setup(self) -> None:
        sam = SAM(self.weights, device=self.config.device, image_size=self.image_size)
        self.decoder = SamMaskDecoder(sam, exclusive=self.config.exclusive_masks)
        settings = TrackerSettings(
            min_score=self.config.min_score,
            min_agreement=self.config.min_agreement,
            max_coast_frames=self.config.max_coast_frames,
            confirm_frames=self.config.confirm_frames,
            use_mask_prompt=self.config.use_mask_prompt,
            process_noise=self.config.process_noise,
            measurement_noise=self.config.measurement_noise,
        )
        self.tracker = PromptTracker(self.decoder, frame_size=None, settings=settings)
        if self.resume_from is not None and self.resume_dir is not None:
            # The prompts are in the saved state, with what became of them.
            self.tracker.restore(*resume.load_tracker_snapshot(self.resume_dir, self.resume_from))
            self.detail["resumed_after_frame"] = self.resume_from
            return
        for prompt in self.config.prompts:
            self.tracker.add(prompt.box, prompt.points, prompt.labels, frame=prompt.frame)

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, EmbeddingMessage) or self.tracker is None or self.decoder is None:
            self.count("unexpected_messages")
            return []
        start = time.perf_counter()
        embedding = embedding_from_wire(msg.embedding, msg.embedding_dtype)
        grid = self.image_size // 16
        if embedding.shape[-2:] != (grid, grid):
            raise RuntimeError(
                f"embedding of {tuple(embedding.shape[-2:])} does not fit image_size "
                f"{self.image_size}: encoder and tracker must use the same image size"
            )
        self.decoder.image = ImageEmbedding(
            embedding[None].to(self.decoder.sam.device), msg.original_size, msg.input_size
        )
        size = (int(msg.original_size[0]), int(msg.original_size[1]))
        if self.tracker.frame_size != size:
            # The first frame, or a mid-stream resolution change (concatenated files, a
            # camera switching profile): the tracks are rescaled and carry on at the new size.
            if self.tracker.frame_size is not None:
                self.count("frame_size_changes")
                self.detail["frame_size"] = list(size)
            self.tracker.set_frame_size(size)
        outputs = [*self._after_outage(msg), *self.tracker.step(msg.meta.frame_index)]
        # The smallest windows go out: every later stage works per pixel of them.
        masks = tuple(o.mask.tight() for o in outputs)
        tracks = tuple(
            TrackRecord(
                track_id=o.track_id,
                box=tuple(float(v) for v in o.box),
                score=float(o.score),
                state=o.state.value,
                frames_since_update=o.frames_since_update,
                innovation=float(o.innovation),
            )
            for o in outputs
        )
        self.count("frames")
        if self.resume_dir is not None:
            self._snapshots.append((msg.meta.frame_index, self.tracker.snapshot()))
        ms = (time.perf_counter() - start) * 1000
        return [
            MaskMessage(
                meta=msg.meta,
                frame_size=msg.original_size,
                tracks=tracks,
                masks=masks,
                image=msg.image,
                timings={**msg.timings, "tracker": ms},
            )
        ]

    def stopped(self) -> None:
        """Stopped mid-run: save the recent states, so that --resume can continue exactly
        where the outputs end (states only of whole frames: a step cut short by the signal
        never made one)."""
        if self.resume_dir is None or not self._snapshots:
            return
        try:
            resume.save_tracker_snapshots(self.resume_dir, dict(self._snapshots))
        except OSError:
            log.exception("tracker: could not save its state; --resume will start it afresh")

    def _after_outage(self, msg: EmbeddingMessage) -> list[TrackOutput]:
        """A new source session means the camera was gone in between. After a short outage
        the tracks carry on (the filter predicts one step, the next measurement decides);
        after one longer than ``lost_after_gap_s`` every track is reported lost."""
        meta = msg.meta
        lost: list[TrackOutput] = []
        if self._last_session is not None and meta.session != self._last_session:
            gap_s = meta.capture_time - self._last_capture
            if gap_s > self.config.lost_after_gap_s and self.tracker is not None:
                lost = self.tracker.lose_all()
                self.count("tracks_lost_to_outages", len(lost))
            else:
                self.count("outages_coasted")
            self.detail["last_outage_s"] = round(gap_s, 3)
        self._last_session, self._last_capture = meta.session, meta.capture_time
        return lost

    def handle_command(self, command: PromptCommand) -> PromptReply:
        """Add / update / remove / list tracks; a bad command changes nothing."""
        if self.tracker is None:
            return PromptReply(ok=False, error="tracker not ready", track_id=None, tracks=())
        try:
            track_id = command.track_id
            if command.op == "add":
                track_id = self.tracker.add(
                    command.box,
                    command.points,
                    command.labels,
                    track_id=command.track_id,
                    frame=command.frame,
                )
            elif command.op == "update":
                if command.track_id is None or command.box is None:
                    raise ValueError("update needs track_id and box")
                self.tracker.update_box(command.track_id, command.box)
            elif command.op == "remove":
                if command.track_id is None:
                    raise ValueError("remove needs track_id")
                self.tracker.remove(command.track_id)
            self.count(f"commands_{command.op}")
            return PromptReply(
                ok=True, error=None, track_id=track_id, tracks=tuple(self.tracker.list())
            )
        except ValueError as err:
            self.count("bad_commands")
            return PromptReply(ok=False, error=str(err), track_id=None, tracks=())
