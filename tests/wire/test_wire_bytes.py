"""The bytes on the wire, pinned: every message kind, with and without its optional buffers.

Each message below is encoded and its parts compared with digests taken from the codec of
schema version 2 as it was before the messages became msgspec Structs (hand-written
``to_frames`` per class). The same parts must decode to the same message, so a new codec is
proven to send what older readers expect and to read what older senders send. The arrays
are made by arithmetic, not by a random generator, so the digests cannot move with numpy.
"""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest

from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import (
    EmbeddingMessage,
    EndOfStream,
    FrameMessage,
    FrameMeta,
    MaskMessage,
    Message,
    StatusMessage,
    TrackRecord,
    decode,
    encode,
)

META = FrameMeta("cam0", 41, 43, 129129, (1, 30000), 1700000123.375)
# A frame whose container pts the decoder repaired: only such frames carry source_pts.
REPAIRED = FrameMeta("cam2", 5, 6, 18018, (1001, 30000), 1700000124.5, session=3, source_pts=17)
NO_PTS = FrameMeta("cam1", 0, 0, None, (1, 25), 1700000000.0)


def image(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w * 3, dtype=np.uint16) * 7 % 251).astype(np.uint8).reshape(h, w, 3)


def window(h: int, w: int, step: int) -> np.ndarray:
    """A (h, w) bool window with a pattern of set pixels (every ``step``-th one)."""
    return (np.arange(h * w) % step == 0).reshape(h, w)


def track(track_id: int, state: str, score: float) -> TrackRecord:
    box = (float(track_id), 1.5, track_id + 4.25, 6.0)
    return TrackRecord(track_id, box, score, state, track_id % 3, track_id / 8)


# Three windows of 3x5, 4x2 (both with unused bits in their last byte), 2x4 (a whole byte),
# and an empty one: the windows' bits one after another, each from a byte of its own.
WINDOWS = (
    RegionMask((8, 12), (1, 2, 6, 5), window(3, 5, 2)),
    RegionMask((8, 12), (10, 4, 12, 8), window(4, 2, 3)),
    RegionMask((8, 12), (0, 0, 4, 2), window(2, 4, 1)),
    RegionMask.empty((8, 12)),
)
TRACKS = (
    track(1, "tracked", 0.875),
    track(2, "coasting", 0.5),
    # numpy scalars, as trackers hand them over: sent as the numbers they hold
    TrackRecord(
        np.int64(9),
        tuple(np.float32(v) for v in (0, 0, 4, 2)),
        np.float32(0.9),
        "tentative",
        np.int32(0),
        np.float64(0.1),
    ),
    track(12, "lost", 0.0),
)

MESSAGES: dict[str, Message] = {
    "frame": FrameMessage(meta=META, image=image(4, 6), timings={"decode": 2.5}),
    "frame-repaired": FrameMessage(meta=REPAIRED, image=image(2, 3)),
    "frame-no-pts": FrameMessage(meta=NO_PTS, image=image(1, 1), timings={}),
    "embedding-float16": EmbeddingMessage(
        meta=META,
        embedding=(np.arange(24, dtype=np.float32) / 8 - 1).astype(np.float16).reshape(2, 3, 4),
        embedding_dtype="float16",
        original_size=(4, 6),
        input_size=(3, 4),
        timings={"decode": 2.5, "encoder": 10.0},
    ),
    "embedding-bfloat16-with-image": EmbeddingMessage(
        meta=REPAIRED,
        embedding=(np.arange(12, dtype=np.uint16) * 4099).reshape(3, 2, 2),
        embedding_dtype="bfloat16",
        original_size=(4, 6),
        input_size=(2, 2),
        image=image(4, 6),
        timings={"decode": 1.0, "encoder": 3.25},
    ),
    "embedding-float32-with-image": EmbeddingMessage(
        meta=NO_PTS,
        embedding=np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 2, 2),
        embedding_dtype="float32",
        original_size=(2, 3),
        input_size=(2, 2),
        image=image(2, 3),
    ),
    "masks-windows": MaskMessage(
        meta=REPAIRED,
        frame_size=(8, 12),
        tracks=TRACKS,
        masks=WINDOWS,
        timings={"decode": 1.0, "encoder": 3.0, "tracker": 2.0, "publish": 0.5, "latency": 9.0},
    ),
    "masks-windows-with-image": MaskMessage(
        meta=META, frame_size=(8, 12), tracks=TRACKS[:2], masks=WINDOWS[:2], image=image(8, 12)
    ),
    "masks-none": MaskMessage(meta=NO_PTS, frame_size=(3, 2), tracks=(), masks=()),
    "masks-dense": MaskMessage(
        meta=META,
        frame_size=(5, 7),
        tracks=(track(3, "tracked", 0.75), track(4, "tracked", 0.25)),
        masks=np.stack([window(5, 7, 4), np.zeros((5, 7), bool)]),
    ),
    "status": StatusMessage(
        node="decoder",
        state="reconnecting",
        time=1700000125.0,
        counters={"frames": 12, "reconnect_attempts": np.int64(2)},
        detail={
            "source_state": {"state": "reconnecting", "session": 1, "down_s": 1.25},
            "stats": {"median_ms": np.float32(1.5), "p95": None},
            "list": [1, [2, 3]],
        },
    ),
    "status-bare": StatusMessage(node="tracker", state="running", time=1.0),
    "end-eof": EndOfStream(stream_id="cam0", frames=44, reason="eof"),
    "end-max-frames": EndOfStream(stream_id="cam2", frames=6, reason="max_frames"),
}

# sha256 of each part of encode(MESSAGES[name]), as the schema-2 codec wrote them.
PINNED: dict[str, list[str]] = {
    "frame": [
        "33b56963aa995737ec85043e9fcd3e8698b917c3dd8bc68fb9ed1ec61e98fe38",
        "8e3394e83932ac0348bc8284276cf9279a5f97269732cc9ca4896570aecfd897",
    ],
    "frame-repaired": [
        "3f59831492f36e442336af9a14af90db85a07f83f3e670f52a91d45ba79e70e4",
        "3ed7ca8e920272d1ba3de8dd300c48973ec4a2ae13c94897e1c66800289d7ffd",
    ],
    "frame-no-pts": [
        "37b9ce2ddf697148ae47b9e0e6c0c8727d322d70f18c59b5ff3c150cd24fead8",
        "b361d0f9a938a2bb4fbdc9c21dc5a859788041b0040919d8a811c1888184f4df",
    ],
    "embedding-float16": [
        "77d349cc1d23bbe4598dfb016711ae28a67a65c1731d77152728e505d5753913",
        "27c9738142571886d456e2450a722d0dda6de3898599fd84a48b6c373e1d5ba1",
    ],
    "embedding-bfloat16-with-image": [
        "41eea7d4b56a9eef0cdcf621c8f33a9ced9932131a1ae64f399cd1cf2d585dc6",
        "1352bea6c79d8919afae16dcefc77e38a4bf8409ecc3440eddb67c206a273b36",
        "8e3394e83932ac0348bc8284276cf9279a5f97269732cc9ca4896570aecfd897",
    ],
    "embedding-float32-with-image": [
        "ec54f9b14cfb285aa4e98c7cbad42a0f80c0cb45ece76ac4350803456cd0aea8",
        "8e85a85ddd084337955565d40c74538e30440f3db1ea25ddc20819446d17222c",
        "3ed7ca8e920272d1ba3de8dd300c48973ec4a2ae13c94897e1c66800289d7ffd",
    ],
    "masks-windows": [
        "1191f2dad1840af6633f9a291f856e28ce994aeec9567b2f7360c44426247015",
        "dcb5135abfc04beb96ad25dced6110593fbd17a7e57afa660dab784bb8decfc7",
    ],
    "masks-windows-with-image": [
        "2e53ed7fd35426ec9b116720cfea73d088457dd7bf0f685ce7e6409e56318bae",
        "9e6c038455109910dfb0214fc9475f8efcbee4cff75a6fc4c4ae3a1d01b5bbe8",
        "909b9a7b0aeba9c168477d2128b3ca56403d9c9ca3d435516f7594dd6447f8b4",
    ],
    "masks-none": [
        "4ad88ce55fcdff7e487d332a1f79493f38aa8d3d5845970c090750098641b560",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ],
    "masks-dense": [
        "77221d2ef46d0a40859c0a38e1dddf60dd7aeb458a421beb8b8d998b0cabe123",
        "7318c377a30b54ada488ea232411da7e4ac26df1d726be0cd04b9f8d1730dbe3",
    ],
    "status": [
        "7bf2968b1b24b8ed3db418e590b9381c06be2f73dc5ac7ff68db05fc6058b761",
    ],
    "status-bare": [
        "8c8ec1bc2ec17c0c7af3d4b0d11ad9979fcb1733222d0aaa62638081636e6554",
    ],
    "end-eof": [
        "f4a359abe8c43266ad4f3cd15b80b480bf7b73369b8f1d058f9cb7810029fd8a",
    ],
    "end-max-frames": [
        "d484318b47110c4a76dcb368a68b7cba8753ec7b1f8cae2ffbcea9a84ccbe84b",
    ],
}


def digests(parts: list) -> list[str]:
    return [hashlib.sha256(bytes(part)).hexdigest() for part in parts]


def fields(msg: Message) -> dict[str, object]:
    """A message's values, arrays and masks as comparable bytes."""
    out = msgspec.structs.asdict(msg)
    for name, value in out.items():
        if isinstance(value, np.ndarray):
            out[name] = (value.dtype.name, value.shape, value.tobytes())
        elif name == "masks":
            out[name] = [(m.frame_size, m.box, m.window.tobytes()) for m in value]
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_the_parts_are_the_pinned_bytes(name: str) -> None:
    parts = encode(MESSAGES[name])
    assert digests(parts) == PINNED[name]


@pytest.mark.parametrize("name", MESSAGES)
def test_the_pinned_bytes_decode_to_the_message(name: str) -> None:
    msg = MESSAGES[name]
    parts = [bytes(part) for part in encode(msg)]
    assert digests(parts) == PINNED[name]  # the bytes of today's senders...
    got = decode(parts)  # ...read as the message they carry
    assert type(got) is type(msg)
    assert fields(got) == fields(msg)
