"""Tracker node: carries each object's prompt from frame to frame and runs the mask decoder.

What comes in is checked against the run before anything is allocated for it: an embedding
for a frame not after the last one processed (stale: repeated, or going back), one whose
``original_size`` is absurd (a side above MAX_FRAME_SIDE) or does not resize to its
``input_size`` at this model's image size (a 6000x6000 frame claimed for a 1024x768 input),
one of the wrong shape or with NaN / infinite values is rejected: counted by kind in the
status detail (``"rejected": {kind: n}``, plus the ``embeddings_rejected`` counter), logged
once per kind, and the run goes on as if it had not come.

Prompt commands come on the runtime's control thread, also while a frame is being decoded:
each is checked and answered at once, with the frame it takes effect on, and applied before
the tracker's next frame (``pipeline.track.commands``), so a command waits milliseconds, not
a frame of hundreds of tracks (seconds on a CPU), and never changes a frame in progress.

State: an offline run's tracker saves its states after its last frames when it is stopped
(for ``--resume``); a live run's saves its latest state about every second (and after a
command changed the tracks), so that a tracker restarted after a death goes on with them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import numpy as np

from pipeline.config import RunConfig, TrackerConfig
from pipeline.infer.embedding_codec import embedding_from_wire
from pipeline.infer.mask_decoder import SamMaskDecoder, build_mask_decoder
from pipeline.model.checkpoint import load_sam_decoder
from pipeline.model.transforms import resized_shape
from pipeline.model.weights import resolve_weights
from pipeline.predictor import ImageEmbedding, resolve_device
from pipeline.run import resume
from pipeline.run.handoff import NodeRuntime
from pipeline.run.live import is_live
from pipeline.run.runtime import Node
from pipeline.track.tracking import PromptTracker, TrackOutput
from pipeline.wire.messages import (
    EmbeddingMessage,
    MaskMessage,
    Message,
    PromptCommand,
    PromptReply,
)

log = logging.getLogger(__name__)

# Tracker states kept for --resume, one per frame: more than can be in flight between the
# tracker and the publisher (their queues hold 2 x transport.hwm), so the state after the
# publisher's last frame is among them. Small: a track's filter and its low-res logits.
SNAPSHOTS_KEPT = 64

# A live run's tracker (under the launcher: NodeRuntime.state_dir holds the directory) saves
# its tracks at most this often, and after a command changed them; a tracker started again
# after a death restores the latest, so the tracks go on with their ids.
LIVE_STATE_INTERVAL_S = 1.0

EMBEDDING_CHANNELS = 256  # MobileSAM's image embedding: 256 x (S/16) x (S/16)
MAX_FRAME_SIDE = 16384
"""Pixels per side of the largest frame an embedding may claim (16K video); past it the claim
is rejected before any mask, window or id image of that size is allocated."""


# Per wire dtype: the unsigned view of its bits and its exponent field. A float is NaN or
# infinite exactly when its exponent bits are all ones: a test on the bits costs a tenth of
# numpy.isfinite (no float compares, no bool array of the embedding's size per test).
_EXPONENT_BITS = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),  # travels as its uint16 bit patterns already
    "float32": (np.uint32, 0x7F800000),
}


def _all_finite(array: np.ndarray, wire_dtype: str) -> bool:
    """No NaN or infinity in an embedding of the given wire dtype."""
    known = _EXPONENT_BITS.get(wire_dtype)
    if known is None or array.dtype.itemsize != np.dtype(known[0]).itemsize:
        return bool(np.isfinite(array).all())  # a dtype this table does not know yet
    view, exponent = known
    bits = array.view(view)
    return not bool(np.any((bits & view(exponent)) == view(exponent)))


class TrackerNode(Node):
    """EmbeddingMessage -> MaskMessage (every track's mask, box, score, state, health)."""

    name = "tracker"
    preload = ("onnxruntime", "openvino")
    inputs = (EmbeddingMessage,)
    outputs = (MaskMessage,)

    @classmethod
    def from_config(cls, config: RunConfig, runtime: NodeRuntime) -> TrackerNode:
        # Offline runs with outputs keep the tracker's recent states for --resume.
        live = is_live(config)
        return cls(
            config.tracker,
            weights=config.weights,
            image_size=config.encoder.image_size,
            resume_dir=None if live or not config.publisher.out else config.publisher.out,
            resume_from=runtime.tracker_frame,
            live_state=runtime.state_path("tracker") if live else None,
        )

    def __init__(
        self,
        config: TrackerConfig,
        *,
        weights: str,
        image_size: int,
        resume_dir: str | None = None,
        resume_from: int | None = None,
        live_state: str | os.PathLike[str] | None = None,
        decoder: SamMaskDecoder | None = None,
    ) -> None:
        """``resume_dir``: an offline run's output directory, where the tracker's states
        after its last frames are saved when it is stopped (for ``--resume``);
        ``resume_from``: start from the state saved there after that frame, not afresh.
        ``live_state``: a live run's directory where the tracks are kept while it runs
        (``LIVE_STATE_INTERVAL_S``); a tracker that finds a state there continues from it
        instead of the configured prompts. ``decoder``: what makes the masks (None: `setup`
        loads it from ``weights``; tests give a scripted one)."""
        super().__init__()
        self.config = config
        self.weights = weights
        self.image_size = image_size
        self.resume_dir = resume_dir
        self.resume_from = resume_from
        self.live_state = live_state
        self.decoder = decoder
        self.tracker: PromptTracker | None = None
        self._last_session: int | None = None
        self._last_capture = 0.0
        # The states after the last frames (a frame is in flight to the publisher for a
        # while: the one after its last written frame is among them).
        self._snapshots: deque[tuple[int, resume.Snapshot]] = deque(maxlen=SNAPSHOTS_KEPT)
        self._rejected_logged: set[str] = set()
        self._live_writer = None if live_state is None else resume.LiveStateWriter(live_state)
        self._live_saved = -float("inf")  # time.monotonic() of the last live state saved
        self._live_applied = 0  # the tracker's commands_applied then

    def setup(self) -> None:
        if self.decoder is None:
            self.decoder = self._load_decoder()
        self.tracker = PromptTracker(self.decoder, frame_size=None, settings=self.config)
        if self.resume_from is not None and self.resume_dir is not None:
            # The prompts are in the saved state, with what became of them.
            self.tracker.restore(*resume.load_tracker_snapshot(self.resume_dir, self.resume_from))
            self.detail["resumed_after_frame"] = self.resume_from
            return
        saved = [] if self.live_state is None else resume.saved_tracker_frames(self.live_state)
        if saved:
            # A restart: the tracks of the tracker that died, as of its last saved frame.
            self.tracker.restore(*resume.load_tracker_snapshot(self.live_state, saved[-1]))
            self.detail["restored_after_frame"] = saved[-1]
            log.info("tracker: tracks restored as they were after frame %d", saved[-1])
            return
        for prompt in self.config.prompts:
            self.tracker.commands.add(prompt.box, prompt.points, prompt.labels, frame=prompt.frame)

    def _load_decoder(self) -> SamMaskDecoder:
        # Only the prompt encoder + mask decoder: the tracker never runs the image encoder.
        device = resolve_device(self.config.device)
        weights_path = resolve_weights(self.weights)
        model = load_sam_decoder(weights_path, img_size=self.image_size).to(device).eval()
        log.info(
            "tracker: loaded the prompt encoder + mask decoder of %s on %s", weights_path, device
        )
        # The decoder backend (for `auto`, a calibration on a machine's first run) is chosen
        # here, in the node's own process, with its thread budget.
        backend = build_mask_decoder(
            model=model,
            weights_path=weights_path,
            backend=self.config.backend,
            threads=self.config.threads,
        )
        self.detail["backend"] = backend.report
        return SamMaskDecoder(model, exclusive=self.config.exclusive_masks, backend=backend)

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, EmbeddingMessage):  # the runtime passes only EmbeddingMessage
            raise TypeError(f"tracker takes EmbeddingMessage, not {type(msg).__name__}")
        if self.tracker is None or self.decoder is None:
            raise RuntimeError("TrackerNode.setup() must run before process()")
        start = time.perf_counter()
        problem = self._embedding_problem(msg)
        if problem is not None:
            self._reject(*problem)
            return []
        embedding = embedding_from_wire(msg.embedding, msg.embedding_dtype)
        image = ImageEmbedding(
            embedding[None].to(self.decoder.model.device), msg.original_size, msg.input_size
        )
        size = (int(msg.original_size[0]), int(msg.original_size[1]))
        if self.tracker.frame_size != size:
            # The first frame, or a mid-stream resolution change (concatenated files, a
            # camera switching profile): the tracks are rescaled and carry on at the new size.
            if self.tracker.frame_size is not None:
                self.count("frame_size_changes")
                self.detail["frame_size"] = list(size)
            self.tracker.set_frame_size(size)
        outputs = [
            *self._after_outage(msg),
            *self.tracker.step(msg.meta.frame_index, image),
        ]
        # The smallest windows go out: every later stage works per pixel of them.
        masks = tuple(o.mask.tight() for o in outputs)
        tracks = tuple(o.record for o in outputs)
        self.count("frames")
        if self.resume_dir is not None:
            self._snapshots.append((msg.meta.frame_index, self.tracker.snapshot()))
        if self.live_state is not None and (
            self.tracker.commands_applied != self._live_applied
            or time.monotonic() - self._live_saved >= LIVE_STATE_INTERVAL_S
        ):
            self._save_live_state(msg.meta.frame_index)
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

    def _embedding_problem(self, msg: EmbeddingMessage) -> tuple[str, str] | None:
        """(kind, why) when the embedding does not fit this run; None when it does. Only
        the header and one pass over the array: nothing is allocated for the frame yet."""
        last = None if self.tracker is None else self.tracker.current_frame
        index = msg.meta.frame_index
        if last is not None and index <= last:
            return "stale_frame", f"frame {index} came after frame {last} was processed"
        height, width = (int(v) for v in msg.original_size)
        if not (1 <= height <= MAX_FRAME_SIDE and 1 <= width <= MAX_FRAME_SIDE):
            return (
                "absurd_size",
                f"original_size {height}x{width} (H x W) is not 1..{MAX_FRAME_SIDE} per side",
            )
        expected = resized_shape(height, width, self.image_size)
        if tuple(int(v) for v in msg.input_size) != expected:
            return (
                "inconsistent_size",
                f"input_size {tuple(msg.input_size)} is not original_size {height}x{width} "
                f"resized to {self.image_size} ({expected})",
            )
        grid = self.image_size // 16
        channels = EMBEDDING_CHANNELS
        if tuple(msg.embedding.shape) != (channels, grid, grid):
            return (
                "embedding_shape",
                f"embedding of shape {tuple(msg.embedding.shape)} does not fit image_size "
                f"{self.image_size} ({channels}x{grid}x{grid}): encoder and tracker must use "
                "the same image size",
            )
        if not _all_finite(msg.embedding, msg.embedding_dtype):
            return "non_finite", "the embedding holds NaN or infinite values"
        return None

    def _reject(self, kind: str, why: str) -> None:
        """Count a rejected embedding by kind (status detail "rejected"); log a kind once."""
        rejected = self.detail.setdefault("rejected", {})
        rejected[kind] = rejected.get(kind, 0) + 1
        self.count("embeddings_rejected")
        if kind not in self._rejected_logged:
            self._rejected_logged.add(kind)
            log.warning(
                "tracker: embedding rejected (%s): %s; the run goes on (further %s rejections "
                "are counted in the status, not logged)",
                kind,
                why,
                kind,
            )

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

    def _save_live_state(self, frame_index: int) -> None:
        if self.tracker is None or self._live_writer is None:
            return
        self._live_writer.submit(frame_index, self.tracker.snapshot())
        self._live_saved, self._live_applied = time.monotonic(), self.tracker.commands_applied

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
        """Add / update / remove / list tracks, from the runtime's control thread: checked
        and queued at once, applied before the next frame; a bad command changes nothing."""
        if self.tracker is None:
            return PromptReply(ok=False, error="tracker not ready")
        reply = self.tracker.commands.answer(command)
        self.count(f"commands_{command.op}" if reply.ok else "bad_commands")
        return reply
