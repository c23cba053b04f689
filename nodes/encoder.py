"""Encoder node: MobileSAM's image encoder, batching frames that are already waiting."""

from __future__ import annotations

import time

from pipeline.config import EncoderConfig, RunConfig
from pipeline.infer.embedding_codec import embedding_to_wire
from pipeline.predictor import SAM
from pipeline.run.handoff import NodeRuntime
from pipeline.run.runtime import Node
from pipeline.wire.messages import EmbeddingMessage, FrameMessage, Message


class EncoderNode(Node):
    """FrameMessage -> EmbeddingMessage. Up to `batch_size` waiting frames go in one batch."""

    name = "encoder"
    preload = ("pipeline.model.image_encoder", "onnxruntime", "openvino")
    inputs = (FrameMessage,)
    outputs = (EmbeddingMessage,)

    @classmethod
    def from_config(cls, config: RunConfig, runtime: NodeRuntime) -> EncoderNode:
        overlay = bool(config.publisher.out) and config.publisher.overlay
        return cls(config.encoder, weights=config.weights, carry_images=overlay)

    def __init__(
        self, config: EncoderConfig, *, weights: str, carry_images: bool, sam: SAM | None = None
    ) -> None:
        """``sam``: what encodes the frames (None: `setup` loads it from ``weights``; tests
        give a scripted one)."""
        super().__init__()
        self.config = config
        self.weights = weights
        # The frame travels on only when a later node draws on it (the overlay video).
        self.carry_images = carry_images
        if config.batch_size is None:
            raise ValueError("encoder.batch_size must be resolved (pipeline.run.live) first")
        self.max_batch = config.batch_size
        self.sam = sam

    def setup(self) -> None:
        if self.sam is not None:
            return
        # The backend (and, for `auto`, a calibration on a machine's first run) is chosen
        # here, in the node's own process, with its thread budget (encoder.threads or
        # $OMP_NUM_THREADS from the launcher).
        self.sam = SAM(
            self.weights,
            device=self.config.device,
            dtype=self.config.dtype,
            image_size=self.config.image_size,
            backend=self.config.backend,
            threads=self.config.threads,
        )
        # In every status message: which backend runs and why (the measured candidates).
        self.detail["backend"] = self.sam.backend_report

    def process_batch(self, msgs: list[Message]) -> list[Message]:
        out: list[Message] = []
        # Frames of one stream share a size; a size change (rare) starts a new batch.
        group: list[FrameMessage] = []
        for msg in msgs:
            if not isinstance(msg, FrameMessage):  # the runtime passes only FrameMessage
                raise TypeError(f"encoder takes FrameMessage, not {type(msg).__name__}")
            if group and msg.image.shape != group[0].image.shape:
                out.extend(self._encode(group))
                group = []
            group.append(msg)
        if group:
            out.extend(self._encode(group))
        return out

    def _encode(self, frames: list[FrameMessage]) -> list[Message]:
        if self.sam is None:
            raise RuntimeError("EncoderNode.setup() must run before process()")
        start = time.perf_counter()
        embeddings, input_size = self.sam.encode_batch([f.image for f in frames])
        wire = embedding_to_wire(embeddings, self.config.embedding_dtype)
        per_frame_ms = (time.perf_counter() - start) * 1000 / len(frames)
        self.count("frames", len(frames))
        self.count("batches")
        return [
            EmbeddingMessage(
                meta=f.meta,
                embedding=wire[i],
                embedding_dtype=self.config.embedding_dtype,
                original_size=(f.image.shape[0], f.image.shape[1]),
                input_size=input_size,
                image=f.image if self.carry_images else None,
                timings={**f.timings, "encoder": per_frame_ms},
            )
            for i, f in enumerate(frames)
        ]
