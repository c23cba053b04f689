"""A real tracker node driven through its sockets, and the embeddings to feed it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from nodes.tracker import TrackerNode
from pipeline.config import TrackerConfig
from pipeline.model.transforms import resized_shape
from pipeline.predictor import SAM
from pipeline.run.runtime import NodeEndpoints, NodeRunner
from pipeline.wire.messages import (
    EmbeddingMessage,
    FrameMeta,
    MaskMessage,
    decode,
    encode,
)

IMAGE_SIZE = 256
FRAME = (96, 128)  # H, W of the frames: small, so upscaling costs little next to decoding


def embedding_message(
    frame: int,
    *,
    original: tuple[int, int] = FRAME,
    input_size: tuple[int, int] | None = None,
    embedding: np.ndarray | None = None,
    image: bool = False,
) -> EmbeddingMessage:
    """An embedding as the encoder sends it (random values, float16), with the frame's
    image when ``image``."""
    meta = FrameMeta(
        stream_id="cam0",
        seq=frame,
        frame_index=frame,
        pts=frame,
        time_base=(1, 25),
        capture_time=time.time(),
    )
    if embedding is None:
        grid = IMAGE_SIZE // 16
        rng = np.random.default_rng(frame)
        embedding = rng.standard_normal((256, grid, grid)).astype(np.float16)
    return EmbeddingMessage(
        meta=meta,
        embedding=embedding,
        embedding_dtype="float16",
        original_size=original,
        input_size=input_size or resized_shape(*original, IMAGE_SIZE),
        image=np.zeros((*original, 3), np.uint8) if image else None,
    )


class LiveTracker:
    """A real TrackerNode in a NodeRunner thread, with the test on the other ends of its
    input (PUSH), output (PULL), status (PULL) and control (REQ) sockets."""

    def __init__(self, weights: Path, tmp: Path, hwm: int = 8) -> None:
        self.ctx = zmq.Context()
        self.node = TrackerNode(TrackerConfig(), weights=str(weights), image_size=IMAGE_SIZE)
        names = ("in", "out", "status", "control")
        self.endpoints = {name: f"ipc://{tmp}/{name}" for name in names}
        self.output = self._socket(zmq.PULL, self.endpoints["out"], rcvhwm=hwm)
        self.status = self._socket(zmq.PULL, self.endpoints["status"])
        self.runner = NodeRunner(
            self.node,
            NodeEndpoints(
                input=self.endpoints["in"],
                output=self.endpoints["out"],
                status=self.endpoints["status"],
                control=self.endpoints["control"],
            ),
            context=self.ctx,
            hwm=hwm,
            status_interval_s=0.2,
        )
        self.codes: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.codes.append(self.runner.run()), daemon=True
        )
        self.thread.start()
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(self.endpoints["in"])

    def _socket(self, kind: int, endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.bind(endpoint)
        return sock

    def command(self, obj: dict, timeout_s: float = 120.0) -> dict:
        """One REQ round trip on the control socket; the reply as JSON."""
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoints["control"])
        try:
            sock.send(json.dumps(obj).encode())
            assert sock.poll(int(timeout_s * 1000)), f"no reply to {obj} in {timeout_s} s"
            return json.loads(sock.recv())
        finally:
            sock.close(linger=0)

    def send(self, msg: EmbeddingMessage) -> None:
        self.input.send_multipart(encode(msg), copy=False)

    def masks(self, count: int, timeout_s: float = 300.0) -> list[MaskMessage]:
        got: list[MaskMessage] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {count} mask messages in {timeout_s} s"
            if self.output.poll(int(min(left, 1.0) * 1000)):
                msg = decode(self.output.recv_multipart())
                if isinstance(msg, MaskMessage):
                    got.append(msg)
        return got

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            assert self.thread.is_alive(), f"the tracker node ended: {self.codes}"
            time.sleep(0.05)

    def latest_status(self, timeout_s: float = 30.0) -> dict:
        """The detail and counters of a status message sent from now on."""
        while self.status.poll(0):
            self.status.recv_multipart()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status.poll(1000):
                msg = decode(self.status.recv_multipart())
                return {"detail": msg.detail, "counters": msg.counters, "state": msg.state}
        raise AssertionError("no status message")

    def close(self) -> None:
        self.runner.stop.set()
        self.thread.join(30)
        alive = self.thread.is_alive()
        for sock in (self.input, self.output, self.status):
            sock.close(linger=0)
        self.ctx.term()
        assert not alive and self.codes == [0], f"the tracker node did not survive: {self.codes}"


def sam_embedding_message(sam: SAM, frame: int, size: tuple[int, int]) -> EmbeddingMessage:
    """The embedding the encoder would send for a random image of ``size``."""
    image = np.random.default_rng(frame).integers(0, 256, (*size, 3), dtype=np.uint8)
    embedded = sam.set_image(image)
    meta = FrameMeta("cam0", frame, frame, frame, (1, 25), 100.0 + frame, session=0)
    return EmbeddingMessage(
        meta=meta,
        embedding=embedded.embedding[0].numpy().astype(np.float16),
        embedding_dtype="float16",
        original_size=size,
        input_size=embedded.input_size,
    )
