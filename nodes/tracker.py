"""Tracker node: carries each object's prompt from frame to frame and runs the mask decoder."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from nodes.encoder import embedding_from_wire
from pipeline.config import TrackerConfig
from pipeline.messages import (
    EmbeddingMessage,
    MaskMessage,
    Message,
    PromptCommand,
    PromptReply,
    TrackRecord,
)
from pipeline.predictor import SAM, ImageEmbedding
from pipeline.prompts import Prompts
from pipeline.runtime import Node
from pipeline.tracking import DecodedMasks, PromptTracker, TrackerSettings, TrackOutput


class SamMaskDecoder:
    """The tracker's batched decoder: MobileSAM's prompt encoder + mask decoder on one frame.

    Rows that share a prompt kind go through the decoder together; in steady state every
    track is a box (+ previous mask) prompt, so a frame is one batched call.
    """

    def __init__(self, sam: SAM) -> None:
        self.sam = sam
        self.image: ImageEmbedding | None = None

    def __call__(
        self,
        boxes: np.ndarray,
        mask_logits: Sequence[np.ndarray | None],
        points: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ) -> DecodedMasks:
        if self.image is None:
            raise RuntimeError("no frame embedding set")
        n = len(boxes)
        h, w = self.image.original_size
        masks = np.zeros((n, h, w), dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        low_res: np.ndarray | None = None
        def has_points(i: int) -> bool:
            return points is not None and points[i] is not None

        plain = [i for i in range(n) if not has_points(i) and mask_logits[i] is None]
        with_mask = [i for i in range(n) if not has_points(i) and mask_logits[i] is not None]
        # A points prompt (a track's first frame only) has its own point count: decoded alone.
        batches = [plain, with_mask, *([i] for i in range(n) if has_points(i))]
        for rows in filter(None, batches):
            logits, batch_scores, batch_low = self._decode(boxes, mask_logits, points, rows)
            masks[rows] = (logits[:, 0] > self.sam.model.mask_threshold).cpu().numpy()
            scores[rows] = batch_scores[:, 0].cpu().numpy()
            if low_res is None:
                low_res = np.zeros((n, *batch_low.shape[-2:]), dtype=np.float32)
            low_res[rows] = batch_low[:, 0].cpu().numpy()
        if low_res is None:
            low_res = np.zeros((0, 1, 1), dtype=np.float32)
        return DecodedMasks(masks=masks, scores=scores, low_res_logits=low_res)

    def _decode(
        self,
        boxes: np.ndarray,
        mask_logits: Sequence[np.ndarray | None],
        points: Sequence[tuple[np.ndarray, np.ndarray] | None] | None,
        rows: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder call for rows that share a prompt kind."""
        box_rows = boxes[rows]
        use_boxes = not np.isnan(box_rows).any()
        point_arr = label_arr = None
        if points is not None and points[rows[0]] is not None:
            coords, labels = points[rows[0]]
            point_arr = np.asarray(coords, dtype=np.float32)[None]
            label_arr = np.asarray(labels, dtype=np.int32)[None]
        prompts = Prompts(
            boxes=box_rows.astype(np.float32) if use_boxes else None,
            points=point_arr,
            labels=label_arr,
        )
        mask_inputs = None
        if mask_logits[rows[0]] is not None:
            stacked = np.stack([mask_logits[i] for i in rows]).astype(np.float32)
            mask_inputs = torch.from_numpy(stacked).reshape(len(rows), 1, *stacked.shape[-2:])
            mask_inputs = mask_inputs.to(self.sam.device)
        return self.sam.decode(self.image, prompts, mask_inputs=mask_inputs)


class TrackerNode(Node):
    """EmbeddingMessage -> MaskMessage (every track's mask, box, score, state, health)."""

    name = "tracker"

    def __init__(self, config: TrackerConfig, *, weights: str, image_size: int) -> None:
        super().__init__()
        self.config = config
        self.weights = weights
        self.image_size = image_size
        self.decoder: SamMaskDecoder | None = None
        self.tracker: PromptTracker | None = None
        self._last_session: int | None = None
        self._last_capture = 0.0

    def setup(self) -> None:
        sam = SAM(self.weights, device=self.config.device, image_size=self.image_size)
        self.decoder = SamMaskDecoder(sam)
        settings = TrackerSettings(
            min_score=self.config.min_score,
            min_agreement=self.config.min_agreement,
            max_coast_frames=self.config.max_coast_frames,
            confirm_frames=self.config.confirm_frames,
            use_mask_prompt=self.config.use_mask_prompt,
        )
        self.tracker = PromptTracker(self.decoder, frame_size=None, settings=settings)
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
        if self.tracker.frame_size is None:
            self.tracker.set_frame_size(msg.original_size)
        outputs = [*self._after_outage(msg), *self.tracker.step(msg.meta.frame_index)]
        h, w = msg.original_size
        masks = np.stack([o.mask for o in outputs]) if outputs else np.zeros((0, h, w), bool)
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
                    command.box, command.points, command.labels,
                    track_id=command.track_id, frame=command.frame,
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
            return PromptReply(ok=True, error=None, track_id=track_id,
                               tracks=tuple(self.tracker.list()))
        except ValueError as err:
            self.count("bad_commands")
            return PromptReply(ok=False, error=str(err), track_id=None, tracks=())
