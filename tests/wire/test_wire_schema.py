"""The wire schema (pipeline.wire.messages.wire_schema) against the headers real nodes send.

A real decoder node runs on a tiny clip and its frames, end marker and statuses are taken
off its sockets; the encoder, tracker and publisher nodes build their messages from those
frames through their own code, with stand-ins for the models (random weights would only
make the numbers different, not the headers). Part 0 of every message, and the prompt
requests and replies, must validate against the schema a non-Python consumer would use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import pytest
import zmq
from support.media import make_clip

from nodes.decoder import DecoderNode
from nodes.publisher import PublisherNode
from pipeline.config import DecoderConfig, EncoderConfig, PublisherConfig, TrackerConfig
from pipeline.run.runtime import NodeEndpoints, NodeRunner
from pipeline.track.exclusive import DecodedMasks
from pipeline.wire.messages import (
    EmbeddingMessage,
    EndOfStream,
    FrameMessage,
    Header,
    MaskMessage,
    PromptCommand,
    PromptReply,
    StatusMessage,
    decode,
    encode,
    wire_schema,
)

if TYPE_CHECKING:
    import torch

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 32  # the tracker's embedding grid is 32 // 16 = 2x2
CLIP_SIZE = (64, 48)  # W, H


def _collect_decoder_run(tmp: Path) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """The parts a real DecoderNode sent for a 4-frame clip: (output, status) messages."""
    clip = make_clip(tmp / "clip.mp4", frames=4, size=CLIP_SIZE)
    ctx = zmq.Context()
    output, status = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    for sock in (output, status):
        sock.setsockopt(zmq.LINGER, 0)
    out_port = output.bind_to_random_port("tcp://127.0.0.1")
    status_port = status.bind_to_random_port("tcp://127.0.0.1")
    runner = NodeRunner(
        DecoderNode(DecoderConfig(source=str(clip))),
        NodeEndpoints(
            output=f"tcp://127.0.0.1:{out_port}", status=f"tcp://127.0.0.1:{status_port}"
        ),
        context=ctx,
        status_interval_s=0.0,  # a status at every beat: the "running" ones too
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.run()), daemon=True)
    thread.start()
    sent: list[list[bytes]] = []
    statuses: list[list[bytes]] = []
    poller = zmq.Poller()
    poller.register(output, zmq.POLLIN)
    poller.register(status, zmq.POLLIN)
    try:
        while not statuses or json.loads(statuses[-1][0])["state"] != "done":
            ready = dict(poller.poll(30_000))
            assert ready, "the decoder node went silent"
            if output in ready:
                sent.append(output.recv_multipart())
                if json.loads(sent[-1][0])["kind"] == "end":
                    # Closing our end tells the decoder that all of it was read.
                    poller.unregister(output)
                    output.close(linger=0)
            if status in ready:
                statuses.append(status.recv_multipart())
        thread.join(30)
        assert codes == [0], "the decoder node failed"
    finally:
        ctx.destroy(linger=0)
    return sent, statuses


class FakeEncoderBackend:
    """The SAM encoder's place in an EncoderNode: embeddings of the right shape."""

    def __init__(self) -> None:
        import torch  # the encoder node's own input type: imported when a test needs it

        self.generator = torch.Generator().manual_seed(0)

    def encode_batch(self, images: list[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        import torch

        height, width = images[0].shape[:2]
        scale = IMAGE_SIZE / max(height, width)
        grid = IMAGE_SIZE // 16
        embeddings = torch.randn(len(images), 256, grid, grid, generator=self.generator)
        return embeddings, (round(height * scale), round(width * scale))


class BoxMaskDecoder:
    """The mask decoder's place in a TrackerNode: a box prompt's mask is its box, a points
    prompt's a square around its first point; score 0.9."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(device="cpu")

    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        height, width = image.original_size  # the frame's ImageEmbedding, from the node
        masks = np.zeros((len(boxes), height, width), bool)
        for row, box in enumerate(boxes):
            if np.isnan(box).any():
                x, y = points[row][0][0]
                box = (x - 3, y - 3, x + 3, y + 3)
            limits = (width, height, width, height)
            x1, y1, x2, y2 = (int(np.clip(v, 0, lim)) for v, lim in zip(box, limits, strict=True))
            masks[row, y1:y2, x1:x2] = True
        scores = np.full(len(boxes), 0.9)
        return DecodedMasks(masks, scores, np.zeros((len(boxes), 16, 16), np.float32))


@pytest.fixture(scope="module")
def node_messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Parts of every header kind as the nodes send them, and the prompt JSON both ways."""
    # The encoder and tracker nodes run torch: imported here, not when the tests are collected.
    from nodes.encoder import EncoderNode
    from nodes.tracker import TrackerNode

    sent, statuses = _collect_decoder_run(tmp_path_factory.mktemp("wire"))
    frames = [msg for msg in map(decode, sent) if isinstance(msg, FrameMessage)]
    assert len(frames) == 4 and isinstance(decode(sent[-1]), EndOfStream)

    embeddings: list[EmbeddingMessage] = []
    for embedding_dtype in ("float16", "bfloat16", "float32"):
        config = EncoderConfig(batch_size=2, embedding_dtype=embedding_dtype)
        encoder = EncoderNode(
            config,
            weights="unused.pt",
            carry_images=embedding_dtype == "float16",
            sam=FakeEncoderBackend(),  # type: ignore[arg-type]
        )
        encoder.setup()
        embeddings += encoder.process_batch(frames)

    tracker = TrackerNode(
        TrackerConfig(),
        weights="unused.pt",
        image_size=IMAGE_SIZE,
        decoder=BoxMaskDecoder(),  # type: ignore[arg-type]
    )
    tracker.setup()
    commands = [
        PromptCommand(op="add", box=(8.0, 8.0, 40.0, 30.0)),
        PromptCommand(op="add", points=((50.0, 20.0),), labels=(1,), frame=2),
        PromptCommand(op="add", points=((20.0, 30.0), (5.0, 5.0)), labels=(1, 0), frame=99),
        PromptCommand(op="update", track_id=1, box=(10.0, 8.0, 42.0, 30.0)),
        PromptCommand(op="remove", track_id=12345),  # refused: no such track
    ]
    replies = [tracker.handle_command(command) for command in commands]
    # Each answered with the frame it takes effect on: before any frame, the first one (0),
    # or the later frame an add asked for; a refused one with none.
    assert [reply.frame for reply in replies] == [0, 2, 99, 0, None]
    masks: list[MaskMessage] = []
    for msg in embeddings[:4]:  # the float16 ones, with their frames
        masks += tracker.process(msg)
    replies.append(tracker.handle_command(PromptCommand(op="list")))
    commands.append(PromptCommand(op="list"))
    assert replies[-1].ok and len(replies[-1].tracks) == 3 and not replies[-2].ok
    assert replies[-1].frame == masks[-1].meta.frame_index + 1  # what the listing leads into

    publisher = PublisherNode(PublisherConfig(out=None), budget_ms=100.0)
    published = [out for msg in masks for out in publisher.process(msg)]
    assert any(msg.tracks for msg in published)
    assert "latency" in published[-1].timings

    return {
        "headers": [
            parts[0]
            for parts in (
                *sent,
                *statuses,
                *(encode(msg) for msg in [*embeddings, *masks, *published]),
            )
        ],
        "commands": [command.to_json() for command in commands],
        "replies": [reply.to_json() for reply in replies],
    }


@pytest.fixture(scope="module")
def validators():
    """(header, prompt command, prompt reply) validators of the one wire schema."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = wire_schema()
    jsonschema.Draft202012Validator.check_schema(schema)

    def of(name: str):  # a prompt message is one of the schema's definitions
        return jsonschema.Draft202012Validator(
            {"$defs": schema["$defs"], "$ref": f"#/$defs/{name}"}
        )

    return jsonschema.Draft202012Validator(schema), of("PromptCommand"), of("PromptReply")


def _errors(validator, data: bytes | memoryview) -> list[str]:
    return [error.message for error in validator.iter_errors(json.loads(bytes(data)))]


def test_every_kind_is_covered(node_messages) -> None:
    kinds = {json.loads(bytes(h))["kind"] for h in node_messages["headers"]}
    assert kinds == {"frame", "embedding", "masks", "status", "end"}
    states = {json.loads(bytes(h)).get("state") for h in node_messages["headers"]}
    assert {"starting", "running", "done"} <= states


def test_node_headers_validate_against_the_schema(node_messages, validators) -> None:
    header_validator, _, _ = validators
    for header in node_messages["headers"]:
        assert _errors(header_validator, header) == [], bytes(header)[:200]


def test_prompt_json_validates_against_the_schema(node_messages, validators) -> None:
    _, command_validator, reply_validator = validators
    for command in node_messages["commands"]:
        assert _errors(command_validator, command) == [], command
    for reply in node_messages["replies"]:
        assert _errors(reply_validator, reply) == [], reply


def test_node_headers_decode_as_the_schema_types(node_messages) -> None:
    """Without jsonschema too: part 0 of each message parses as the types the schema is made
    of, and the prompt JSON as PromptCommand / PromptReply."""
    for header in node_messages["headers"]:
        msgspec.json.decode(bytes(header), type=Header)
    for command in node_messages["commands"]:
        PromptCommand.from_json(command)
    for reply in node_messages["replies"]:
        PromptReply.from_json(reply)


def test_the_schema_refuses_what_readers_refuse(node_messages, validators) -> None:
    header_validator, command_validator, reply_validator = validators
    masks = next(
        json.loads(bytes(h))
        for h in node_messages["headers"]
        if b'"masks"' in bytes(h) and b'"track_id"' in bytes(h)
    )
    bad_state = {**masks, "tracks": [{**masks["tracks"][0], "state": "gone"}]}
    assert list(header_validator.iter_errors(bad_state))
    assert list(header_validator.iter_errors({**masks, "v": 1}))
    assert list(header_validator.iter_errors({**masks, "kind": "bogus"}))
    status = StatusMessage("decoder", "running", 1.0)
    paused = {**json.loads(bytes(encode(status)[0])), "state": "paused"}
    assert list(header_validator.iter_errors(paused))
    # Readers ignore header fields they do not know; prompt JSON refuses them.
    assert not list(header_validator.iter_errors({**masks, "future": 1}))
    assert list(command_validator.iter_errors({"op": "add", "bbox": [1, 2, 3, 4]}))
    assert list(reply_validator.iter_errors({"ok": True, "tracks": [{"track_id": 1}]}))


def test_the_schema_is_printed_by_the_module() -> None:
    """``python -m pipeline.wire.messages`` writes the schema: kept generated, never stale."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.wire.messages"],
        capture_output=True,
        check=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    ).stdout
    assert json.loads(out) == json.loads(json.dumps(wire_schema()))
