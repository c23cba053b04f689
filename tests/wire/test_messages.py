"""Messages: wire round trips (in memory and over real sockets) and rejection of bad ones."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
import zmq

from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import (
    SCHEMA_VERSION,
    STATUS_STATES,
    EmbeddingMessage,
    EndOfStream,
    FrameMessage,
    FrameMeta,
    MaskMessage,
    Message,
    MessageError,
    PromptCommand,
    PromptReply,
    StatusMessage,
    TrackRecord,
    decode,
    encode,
)
from pipeline.wire.transport import send_message

pytestmark = pytest.mark.timeout(30)

RNG = np.random.default_rng(0)


def meta(seq: int = 0, stream_id: str = "cam0") -> FrameMeta:
    return FrameMeta(
        stream_id=stream_id,
        seq=seq,
        frame_index=seq,
        pts=seq * 3003,
        time_base=(1, 30000),
        capture_time=1_700_000_000.25,
    )


def image(h: int = 6, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def track(track_id: int) -> TrackRecord:
    return TrackRecord(
        track_id=track_id,
        box=(1.0, 2.0, 5.5, 4.0),
        score=0.9,
        state="tracked",
        frames_since_update=0,
        innovation=0.125,
    )


def masks(n: int, h: int = 6, w: int = 10) -> np.ndarray:
    return RNG.random((n, h, w)) > 0.5


SAMPLES: dict[str, Message] = {
    "frame": FrameMessage(meta=meta(), image=image()),
    "embedding-float16-with-image": EmbeddingMessage(
        meta=meta(1),
        embedding=RNG.standard_normal((4, 3, 5)).astype(np.float16),
        embedding_dtype="float16",
        original_size=(6, 10),
        input_size=(3, 5),
        image=image(),
        timings={"encode": 7.5},
    ),
    "embedding-bfloat16-as-uint16": EmbeddingMessage(
        meta=meta(2),
        embedding=RNG.integers(0, 2**16, (4, 3, 5), dtype=np.uint16),
        embedding_dtype="bfloat16",
        original_size=(6, 10),
        input_size=(3, 5),
    ),
    "embedding-float32": EmbeddingMessage(
        meta=meta(3),
        embedding=RNG.standard_normal((2, 2, 2)).astype(np.float32),
        embedding_dtype="float32",
        original_size=(6, 10),
        input_size=(3, 5),
    ),
    # 3 * 6 * 10 = 180 bits: not a multiple of 8, so the padding of the last byte is used.
    "masks-with-image": MaskMessage(
        meta=FrameMeta("cam1", 4, 4, None, (1, 1), 1.5),
        frame_size=(6, 10),
        tracks=(track(1), track(2), track(7)),
        masks=masks(3),
        image=image(),
        timings={"decode": 2.0, "track": 0.5},
    ),
    "masks-empty": MaskMessage(
        meta=meta(5), frame_size=(6, 10), tracks=(), masks=np.zeros((0, 6, 10), bool)
    ),
    "status": StatusMessage(
        node="encoder",
        state="degraded",
        time=1_700_000_001.0,
        counters={"frames": 10, "dropped": 2},
        detail={"device": "cpu", "queue": [1, 2], "note": None},
    ),
    "end": EndOfStream(stream_id="cam0", frames=6, reason="eof"),
}


def assert_same(got: Message, want: Message) -> None:
    assert type(got) is type(want)
    for f in msgspec.structs.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, np.ndarray):
            assert isinstance(a, np.ndarray), f.name
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        elif f.name == "masks":  # RegionMasks: the same windows with the same pixels
            assert [m.box for m in a] == [m.box for m in b]
            assert all(np.array_equal(x.window, y.window) for x, y in zip(a, b, strict=True))
        else:
            assert a == b, f.name


@pytest.mark.parametrize("name", SAMPLES)
def test_round_trip_in_memory(name: str) -> None:
    msg = SAMPLES[name]
    assert_same(type(msg).from_frames(msg.to_frames()), msg)
    assert_same(decode(encode(msg)), msg)
    # What a socket hands over is bytes: the same must work from copies.
    assert_same(decode([bytes(part) for part in encode(msg)]), msg)


@pytest.fixture
def push_pull():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    yield push, pull
    ctx.destroy(linger=0)


def test_round_trip_over_push_pull(push_pull) -> None:
    push, pull = push_pull
    for msg in SAMPLES.values():
        send_message(push, msg)
    for msg in SAMPLES.values():
        assert pull.poll(5000), "message did not arrive"
        assert_same(decode(pull.recv_multipart(copy=False)), msg)


def test_non_contiguous_arrays_are_sent_correctly(push_pull) -> None:
    push, pull = push_pull
    wide = image(6, 20)
    frame = FrameMessage(meta=meta(), image=wide[:, ::2])  # strided view
    embedding = EmbeddingMessage(
        meta=meta(),
        embedding=np.asfortranarray(RNG.standard_normal((4, 3, 5)).astype(np.float16)),
        embedding_dtype="float16",
        original_size=(6, 10),
        input_size=(3, 5),
    )
    mask_msg = MaskMessage(
        meta=meta(),
        frame_size=(6, 10),
        tracks=(track(1),),
        masks=masks(1, 10, 6).transpose(0, 2, 1),
    )
    for msg in (frame, embedding, mask_msg):
        assert_same(decode(msg.to_frames()), msg)
        send_message(push, msg)
        assert pull.poll(5000)
        assert_same(decode(pull.recv_multipart(copy=False)), msg)


def test_contiguous_arrays_are_not_copied_on_send() -> None:
    msg = SAMPLES["embedding-float16-with-image"]
    _, embedding_part, image_part = msg.to_frames()
    assert np.shares_memory(np.frombuffer(embedding_part, np.uint8), msg.embedding)
    assert np.shares_memory(np.frombuffer(image_part, np.uint8), msg.image)


def test_decoded_arrays_view_the_received_buffers() -> None:
    parts = [bytes(p) for p in SAMPLES["frame"].to_frames()]
    got = decode(parts)
    assert np.shares_memory(got.image, np.frombuffer(parts[1], np.uint8))


def test_wire_format_as_documented() -> None:
    """What a non-Python consumer relies on: JSON header fields, the mask windows and the
    bit order of their pixels."""
    m = np.zeros((2, 5, 7), bool)
    m[0, 1, 2] = True  # window (2, 1, 6, 4): pixel 0 -> most significant bit of byte 0
    m[0, 3, 5] = True  # window pixel 2 * 4 + 3 = 11 -> bit 7 - 3 of byte 1
    msg = MaskMessage(meta=meta(7), frame_size=(5, 7), tracks=(track(3), track(4)), masks=m)
    parts = msg.to_frames()
    assert len(parts) == 2
    header = json.loads(bytes(parts[0]).decode("utf-8"))
    assert header["kind"] == "masks" and header["v"] == SCHEMA_VERSION == 2
    assert header["meta"] == {
        "stream_id": "cam0",
        "seq": 7,
        "frame_index": 7,
        "pts": 7 * 3003,
        "time_base": [1, 30000],
        "capture_time": 1_700_000_000.25,
        "session": 0,
    }
    assert header["frame_size"] == [5, 7]
    assert header["tracks"][0]["track_id"] == 3 and header["tracks"][0]["box"] == [1, 2, 5.5, 4]
    # Track 4's mask is empty: an empty window, no bits.
    assert header["mask_windows"] == [[2, 1, 6, 4], [0, 0, 0, 0]]
    assert header["buffers"] == [{"name": "masks", "dtype": "uint8", "shape": [2]}]
    assert bytes(parts[1]) == bytes([0b1000_0000, 0b0001_0000])

    frame_header = json.loads(bytes(SAMPLES["frame"].to_frames()[0]))
    assert frame_header["buffers"] == [{"name": "image", "dtype": "uint8", "shape": [6, 10, 3]}]


def test_time_seconds() -> None:
    assert meta(10).time_seconds == pytest.approx(10 * 3003 / 30000)
    assert msgspec.structs.replace(meta(), pts=None).time_seconds is None


def test_numpy_scalars_in_headers_are_sent_as_numbers() -> None:
    rec = TrackRecord(
        track_id=np.int64(4),
        box=tuple(np.float32(v) for v in (0, 1, 2, 3)),
        score=np.float32(0.5),
        state="coasting",
        frames_since_update=np.int32(2),
        innovation=np.float64(1.0),
    )
    msg = MaskMessage(meta=meta(), frame_size=(2, 2), tracks=(rec,), masks=np.ones((1, 2, 2), bool))
    got = decode(msg.to_frames())
    assert got.tracks[0] == TrackRecord(4, (0.0, 1.0, 2.0, 3.0), 0.5, "coasting", 2, 1.0)


# --------------------------------------------------------------------- malformed messages


def with_header(parts: list, **changes) -> list:
    header = json.loads(bytes(parts[0]))
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    return [json.dumps(header).encode(), *parts[1:]]


def frame_parts() -> list:
    return [bytes(p) for p in SAMPLES["frame"].to_frames()]


def mask_parts() -> list:
    return [bytes(p) for p in SAMPLES["masks-with-image"].to_frames()]


def with_meta(**changes) -> list:
    parts = frame_parts()
    header = json.loads(parts[0])
    header["meta"].update(changes)
    return [json.dumps(header).encode(), *parts[1:]]


def with_buffer_spec(index: int, **changes) -> list:
    parts = frame_parts() if index == 0 else mask_parts()
    header = json.loads(parts[0])
    header["buffers"][index].update(changes)
    return [json.dumps(header).encode(), *parts[1:]]


MALFORMED = {
    "empty": ([], "empty message"),
    "wrong version": (with_header(frame_parts(), v=1), "schema version 1 is not supported"),
    "no version": (with_header(frame_parts(), v=None), "header: Object missing required field `v`"),
    "unknown kind": (with_header(frame_parts(), kind="bogus"), "unknown message kind 'bogus'"),
    "too few parts": (frame_parts()[:1], r"1 part\(s\) but its header lists 1 buffer"),
    "too many parts": ([*frame_parts(), b"x"], r"3 part\(s\) but its header lists 1 buffer"),
    "size mismatch": (
        [frame_parts()[0], frame_parts()[1][:-1]],
        r"179 bytes do not match uint8 \[6, 10, 3\] \(180 bytes\)",
    ),
    "buffer size mismatch": (
        [mask_parts()[0], mask_parts()[1] + b"\0", mask_parts()[2]],
        r"25 bytes do not match uint8 \[24\]",
    ),
    "garbage json": ([b"{not json", b""], "header: JSON is malformed: object keys must be strings"),
    "not utf-8": ([b"\xff\xfe{}"], r"header: JSON is malformed: invalid character \(byte 0\)"),
    "header not a dict": ([b"[1, 2]"], "header: Expected `object`, got `array`"),
    "NaN in header": (
        [b'{"kind": "end", "v": 2, "frames": NaN}'],
        r"header: JSON is malformed: invalid character \(byte 34\)",
    ),
    "infinite number": (
        [b'{"kind": "end", "v": 2, "stream_id": "a", "frames": 1e999, "reason": "eof"}'],
        r"header: Number out of range - at `\$.frames`",
    ),
    "header too large": ([b"{" + b'"a": 1, ' * 200_000 + b'"b": 2}'], "more than 1048576"),
    "nested too deeply": (
        [b'{"kind": "end", "v": 2, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"],
        "header: maximum recursion depth exceeded",
    ),
    "too many digits": (
        [
            b'{"kind": "end", "v": 2, "stream_id": "a", "frames": '
            + b"1" * 5000
            + b', "reason": ""}'
        ],
        r"header: Integer value out of range - at `\$.frames`",
    ),
    "missing field": (
        with_header(frame_parts(), meta={}),
        r"header: Object missing required field `stream_id` - at `\$.meta`",
    ),
    "null field": (with_meta(seq=None), r"header: Expected `int`, got `null` - at `\$.meta.seq`"),
    "wrong field type": (
        with_meta(seq="3"),
        r"header: Expected `int`, got `str` - at `\$.meta.seq`",
    ),
    "bool is not int": (
        with_meta(frame_index=True),
        r"Expected `int`, got `bool` - at `\$.meta.frame_index`",
    ),
    "bad time base": (
        with_meta(time_base=[1]),
        r"Expected `array` of length 2 - at `\$.meta.time_base`",
    ),
    "zero time base": (with_meta(time_base=[1, 0]), "positive denominator"),
    "unsupported dtype": (
        with_buffer_spec(0, dtype="float64"),
        r"Invalid enum value 'float64' - at `\$.buffers\[0\].dtype`",
    ),
    "negative shape": (
        with_buffer_spec(0, shape=[-1, 10, 3]),
        r"Expected `int` >= 0 - at `\$.buffers\[0\].shape\[0\]`",
    ),
    "wrong buffer name": (
        with_buffer_spec(0, name="img"),
        r"buffers must be one of \[\['image'\]\]",
    ),
    "unknown encoding": (
        with_buffer_spec(1, encoding="rle"),
        r"Expected `null`, got `str` - at `\$.buffers\[1\].encoding`",
    ),
    "image not HxWx3": (
        [
            json.dumps(
                {
                    **json.loads(frame_parts()[0]),
                    "buffers": [{"name": "image", "dtype": "uint8", "shape": [180]}],
                }
            ).encode(),
            frame_parts()[1],
        ],
        "image must be HxWx3 uint8",
    ),
    "masks do not match tracks": (
        with_header(mask_parts(), tracks=[]),
        "3 masks for 0 tracks: one mask per track",
    ),
    "bad track state": (
        with_header(
            mask_parts(), tracks=[{**msgspec.structs.asdict(track(1)), "state": "gone"}] * 3
        ),
        r"Invalid enum value 'gone' - at `\$.tracks\[0\].state`",
    ),
    "status with buffers": (
        [*SAMPLES["status"].to_frames(), b"extra"],
        r"2 part\(s\) but its header lists 0 buffer",
    ),
}


def window_parts(**changes) -> list:
    """A masks message of one track whose window (1, 1, 4, 4) holds 9 pixels (2 bytes, 7
    unused bits), with header fields changed."""
    window = np.zeros((3, 3), bool)
    window[0, 0] = window[2, 2] = True
    region = RegionMask((6, 10), (1, 1, 4, 4), window)
    msg = MaskMessage(meta=meta(), frame_size=(6, 10), tracks=(track(1),), masks=(region,))
    return with_header([bytes(p) for p in msg.to_frames()], **changes)


def with_mask_bytes(data: bytes) -> list:
    header, _ = window_parts()
    spec = json.loads(header)
    spec["buffers"][0]["shape"] = [len(data)]
    return [json.dumps(spec).encode(), data]


MALFORMED_WINDOWS = {
    "window past the right edge": (
        window_parts(mask_windows=[[8, 1, 11, 4]]),
        r"mask_windows\[0\] \[8, 1, 11, 4\] does not",
    ),
    "window past the bottom": (window_parts(mask_windows=[[1, 4, 4, 7]]), "10x6 frame"),
    "negative window": (
        window_parts(mask_windows=[[-1, 1, 2, 4]]),
        r"Expected `int` >= 0 - at `\$.mask_windows\[0\]\[0\]`",
    ),
    "inverted window": (window_parts(mask_windows=[[4, 1, 1, 4]]), "does not lie in"),
    "window of 3 numbers": (
        window_parts(mask_windows=[[1, 1, 4]]),
        r"Expected `array` of length 4 - at `\$.mask_windows\[0\]`",
    ),
    "window of floats": (
        window_parts(mask_windows=[[1, 1, 4.5, 4]]),
        r"Expected `int`, got `float` - at `\$.mask_windows\[0\]\[2\]`",
    ),
    "no windows": (
        window_parts(mask_windows=None),
        "header: Object missing required field `mask_windows`",
    ),
    "windows not a list": (
        window_parts(mask_windows="1,1,4,4"),
        r"Expected `array`, got `str` - at `\$.mask_windows`",
    ),
    "one window too many": (
        window_parts(mask_windows=[[1, 1, 4, 4], [0, 0, 0, 0]]),
        "2 masks for 1 tracks: one mask per track",
    ),
    "bits of a smaller window": (
        window_parts(mask_windows=[[1, 1, 6, 5]]),
        "2 bytes, but the mask_windows' bits take 3",
    ),
    "too many bytes": (with_mask_bytes(b"\x80\x80\x00"), "3 bytes, but the mask_windows"),
    "no bytes": (with_mask_bytes(b""), "0 bytes, but the mask_windows' bits take 2"),
    "unused bits set": (with_mask_bytes(b"\x88\x81"), "unused bits after window 0"),
    "zero frame size": (
        window_parts(frame_size=[0, 10]),
        r"Expected `int` >= 1 - at `\$.frame_size\[0\]`",
    ),
    "masks buffer not bytes": (
        [
            json.dumps(
                {
                    **json.loads(window_parts()[0]),
                    "buffers": [{"name": "masks", "dtype": "uint16", "shape": [1]}],
                }
            ).encode(),
            window_parts()[1],
        ],
        r"buffer: masks must be B uint8, got uint16 \(1,\)",
    ),
}


@pytest.mark.parametrize("name", MALFORMED_WINDOWS)
def test_malformed_mask_windows_are_rejected(name: str) -> None:
    parts, match = MALFORMED_WINDOWS[name]
    with pytest.raises(MessageError, match=match):
        decode(parts)


def test_window_parts_are_well_formed() -> None:
    (got,) = decode(window_parts()).masks
    assert got.box == (1, 1, 4, 4) and got.window.sum() == 2 and got.window[2, 2]


def test_masks_travel_as_their_windows() -> None:
    """A small object on a large frame costs its window's bits, not the frame's: an 8x8
    object on a 1080p frame is 8 bytes, where the whole frame's bits were 259200."""
    masks = np.zeros((2, 1080, 1920), bool)
    masks[0, 500:508, 900:908] = True
    masks[1, 0:3, 1915:1920] = True  # at the frame's corner
    msg = MaskMessage(
        meta=meta(), frame_size=(1080, 1920), tracks=(track(1), track(2)), masks=masks
    )
    parts = msg.to_frames()
    assert len(bytes(parts[1])) == 8 + 2  # 64 bits, then 15 bits
    got = decode(parts)
    assert [m.box for m in got.masks] == [(900, 500, 908, 508), (1915, 0, 1920, 3)]
    assert np.array_equal(got.dense_masks(), masks)


def test_given_windows_are_kept() -> None:
    """Windows need not be tight: a mask goes out in the window it comes in (the tracker
    sends tight ones), and an empty mask may have a window of False pixels."""
    window = np.zeros((4, 5), bool)
    window[1, 2] = True
    regions = (
        RegionMask((6, 10), (3, 1, 8, 5), window),
        RegionMask((6, 10), (0, 0, 2, 2), np.zeros((2, 2), bool)),
    )
    msg = MaskMessage(meta=meta(), frame_size=(6, 10), tracks=(track(1), track(2)), masks=regions)
    got = decode(msg.to_frames())
    assert [m.box for m in got.masks] == [(3, 1, 8, 5), (0, 0, 2, 2)]
    assert np.array_equal(got.masks[0].window, window) and not got.masks[1].any()


def test_masks_of_another_frame_are_refused() -> None:
    other = RegionMask.from_dense(np.ones((6, 11), bool))
    with pytest.raises(MessageError, match=r"belongs to a \(6, 11\) frame"):
        MaskMessage(meta=meta(), frame_size=(6, 10), tracks=(track(1),), masks=(other,))
    with pytest.raises(MessageError, match="1 masks for 2 tracks"):
        MaskMessage(meta=meta(), frame_size=(6, 10), tracks=(track(1), track(2)), masks=masks(1))
    with pytest.raises(MessageError, match="frame is"):
        MaskMessage(meta=meta(), frame_size=(6, 10), tracks=(track(1),), masks=masks(1, 5, 10))


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_messages_are_rejected(name: str) -> None:
    parts, match = MALFORMED[name]
    with pytest.raises(MessageError, match=match):
        decode(parts)


def test_message_error_is_a_value_error() -> None:
    assert issubclass(MessageError, ValueError)


def test_from_frames_checks_the_kind() -> None:
    with pytest.raises(MessageError, match="expected a 'frame' message, got kind 'masks'"):
        FrameMessage.from_frames(SAMPLES["masks-empty"].to_frames())


def test_constructors_reject_inconsistent_messages() -> None:
    with pytest.raises(MessageError, match="float16 array for embedding_dtype 'float16'"):
        EmbeddingMessage(meta(), np.zeros((2, 2, 2), np.uint16), "float16", (6, 10), (3, 5))
    with pytest.raises(MessageError, match="embedding_dtype 'int8'"):
        EmbeddingMessage(meta(), np.zeros((2, 2, 2), np.uint16), "int8", (6, 10), (3, 5))
    with pytest.raises(MessageError, match="image is 6x10 but the size says"):
        EmbeddingMessage(
            meta(), np.zeros((2, 2, 2), np.float16), "float16", (5, 10), (3, 5), image=image()
        )
    with pytest.raises(MessageError, match="non-finite"):
        msgspec.structs.replace(track(1), score=float("nan"))
    with pytest.raises(MessageError, match="image must be HxWx3 uint8"):
        FrameMessage(meta(), np.zeros((6, 10), np.uint8))
    with pytest.raises(MessageError, match="cannot put a"):
        StatusMessage("n", "running", 0.0, detail={"x": object()}).to_frames()
    with pytest.raises(TypeError, match="not a pipeline message"):
        encode("frame")


# --------------------------------------------------------------------- prompt control

COMMANDS = [
    PromptCommand(op="add", box=(10.0, 20.0, 110.0, 220.5)),
    PromptCommand(op="add", track_id=5, points=((1.0, 2.0), (3.5, 4.0)), labels=(1, 0), frame=120),
    PromptCommand(op="update", track_id=5, box=(0.0, 0.0, 1.0, 1.0)),
    PromptCommand(op="remove", track_id=5),
    PromptCommand(op="list"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.op)
def test_prompt_command_round_trip(command: PromptCommand) -> None:
    assert PromptCommand.from_json(command.to_json()) == command


def test_prompt_command_minimal_json() -> None:
    got = PromptCommand.from_json('{"op": "add", "box": [1, 2, 3, 4]}')
    assert got == PromptCommand(op="add", box=(1.0, 2.0, 3.0, 4.0))
    assert isinstance(got.box[0], float)


BAD_COMMANDS = {
    "garbage": (b"add box", "prompt command: JSON is malformed: invalid character"),
    "not an object": (b'["add"]', "prompt command: Expected `object`, got `array`"),
    "no op": (b'{"box": [1, 2, 3, 4]}', "prompt command: Object missing required field `op`"),
    "unknown op": (b'{"op": "delete", "track_id": 1}', r"Invalid enum value 'delete' - at `\$.op`"),
    "unknown field": (
        b'{"op": "add", "bbox": [1, 2, 3, 4]}',
        "Object contains unknown field `bbox`",
    ),
    "track id string": (
        b'{"op": "remove", "track_id": "1"}',
        r"Expected `int \| null`, got `str` - at `\$.track_id`",
    ),
    "track id bool": (
        b'{"op": "remove", "track_id": true}',
        r"Expected `int \| null`, got `bool` - at `\$.track_id`",
    ),
    "box of 3": (b'{"op": "add", "box": [1, 2, 3]}', r"Expected `array` of length 4 - at `\$.box`"),
    "box of strings": (
        b'{"op": "add", "box": ["1", 2, 3, 4]}',
        r"Expected `float`, got `str` - at `\$.box\[0\]`",
    ),
    "box not a list": (
        b'{"op": "add", "box": "1,2,3,4"}',
        r"Expected `array \| null`, got `str` - at `\$.box`",
    ),
    "NaN box": (
        b'{"op": "add", "box": [NaN, 2, 3, 4]}',
        r"JSON is malformed: invalid character \(byte 22\)",
    ),
    "bad point": (
        b'{"op": "add", "points": [[1, 2, 3]]}',
        r"Expected `array` of length 2 - at `\$.points\[0\]`",
    ),
    "labels mismatch": (
        b'{"op": "add", "points": [[1, 2]], "labels": [1, 0]}',
        "one label per point",
    ),
    "labels without points": (
        b'{"op": "add", "box": [1, 2, 3, 4], "labels": [1]}',
        "labels need points",
    ),
    "float label": (
        b'{"op": "add", "points": [[1, 2]], "labels": [1.0]}',
        r"Expected `int`, got `float` - at `\$.labels\[0\]`",
    ),
    "remove without id": (b'{"op": "remove"}', "'remove' needs a track_id"),
    "add without prompt": (b'{"op": "add", "track_id": 3}', "'add' needs a box or points"),
    "update without box": (b'{"op": "update", "track_id": 3}', "'update' needs a box"),
    "update with points": (
        b'{"op": "update", "track_id": 3, "box": [1, 2, 3, 4], "points": [[2, 3]]}',
        "takes no points",
    ),
    "remove at a frame": (b'{"op": "remove", "track_id": 3, "frame": 9}', "takes no frame"),
    "frame float": (
        b'{"op": "list", "frame": 1.5}',
        r"Expected `int \| null`, got `float` - at `\$.frame`",
    ),
}


@pytest.mark.parametrize("name", BAD_COMMANDS)
def test_bad_prompt_commands_are_rejected(name: str) -> None:
    data, match = BAD_COMMANDS[name]
    with pytest.raises(MessageError, match=match):
        PromptCommand.from_json(data)


def test_prompt_reply_round_trip() -> None:
    for reply in (
        PromptReply(ok=True, track_id=3, frame=17),
        PromptReply(ok=False, error="box lies outside the 640x480 frame"),
        PromptReply(ok=True, tracks=LISTING),
    ):
        assert PromptReply.from_json(reply.to_json()) == reply


LISTING = (  # the rows of a "list" reply, as PromptTracker.list() makes them
    {
        "track_id": 1,
        "state": "tracked",
        "box": [0.0, 1.0, 5.0, 6.0],
        "score": 0.9,
        "frames_since_update": 0,
        "pending": False,
        "start_frame": None,
    },
    {
        "track_id": 2,
        "state": "tentative",
        "box": None,
        "score": 0.0,
        "frames_since_update": 0,
        "pending": True,
        "start_frame": 30,
    },
)


def test_prompt_reply_tracks_are_checked_rows() -> None:
    got = PromptReply.from_json(PromptReply(ok=True, tracks=LISTING).to_json())
    assert got.tracks == LISTING and isinstance(got.tracks[0], dict)  # rows stay plain dicts
    row = json.dumps({**LISTING[0], "box": [1, 2, 3]}).encode()
    with pytest.raises(
        MessageError, match=r"Expected `array` of length >= 4 - at `\$.tracks\[0\].box`"
    ):
        PromptReply.from_json(b'{"ok": true, "tracks": [' + row + b"]}")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "prompt reply: Input data was truncated"),
        (b'{"error": null}', "Object missing required field `ok`"),
        (b'{"ok": "yes"}', r"Expected `bool`, got `str` - at `\$.ok`"),
        (b'{"ok": true, "tracks": [1]}', r"Expected `object`, got `int` - at `\$.tracks\[0\]`"),
        (
            b'{"ok": true, "tracks": [{"track_id": 1}]}',
            r"Object missing required field `state` - at `\$.tracks\[0\]`",
        ),
        # A listing keyed "id", as the control protocol had it before "track_id".
        (
            b'{"ok": true, "tracks": [{"id": 1, "state": "tracked", "box": null, "score": 0.9,'
            b' "frames_since_update": 0, "pending": false, "start_frame": null}]}',
            r"Object missing required field `track_id` - at `\$.tracks\[0\]`",
        ),
        (b'{"ok": true, "frame": -1}', r"Expected `int` >= 0 - at `\$.frame`"),
        (b'{"ok": true, "extra": 1}', "Object contains unknown field `extra`"),
    ],
)
def test_bad_prompt_replies_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        PromptReply.from_json(data)


# --------------------------------------------------------------------- wire compatibility

# Parts written by the hand-written codec that msgspec replaced (commit 82924af), byte for
# byte. Decoding them proves old senders still reach new readers; encoding the same messages
# to the same bytes proves new senders still reach old readers.
GOLDEN_META = FrameMeta("cam0", 7, 9, 27027, (1, 30000), 1700000000.25, session=2, source_pts=27000)
GOLDEN_IMAGE = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
GOLDEN_WINDOW = np.array([[1, 0, 0], [0, 0, 1]], bool)
GOLDEN: dict[str, tuple[Message, list[bytes]]] = {
    "frame": (
        FrameMessage(meta=GOLDEN_META, image=GOLDEN_IMAGE, timings={"decode": 1.25}),
        [
            b'{"kind": "frame", "v": 2, "meta": {"stream_id": "cam0", "seq": 7, "frame_index": 9,'
            b' "pts": 27027, "time_base": [1, 30000], "capture_time": 1700000000.25, "session": 2,'
            b' "source_pts": 27000}, "timings": {"decode": 1.25}, "buffers": [{"name": "image",'
            b' "dtype": "uint8", "shape": [2, 2, 3]}]}',
            bytes(range(12)),
        ],
    ),
    "embedding": (
        EmbeddingMessage(
            meta=FrameMeta("cam1", 0, 0, None, (1, 25), 1700000001.5),
            embedding=np.arange(8, dtype=np.uint16).reshape(2, 2, 2),
            embedding_dtype="bfloat16",
            original_size=(2, 2),
            input_size=(2, 1),
            image=GOLDEN_IMAGE,
            timings={"decode": 1.0, "encoder": 12.5},
        ),
        [
            b'{"kind": "embedding", "v": 2, "meta": {"stream_id": "cam1", "seq": 0,'
            b' "frame_index": 0, "pts": null, "time_base": [1, 25], "capture_time": 1700000001.5,'
            b' "session": 0}, "embedding_dtype": "bfloat16", "original_size": [2, 2],'
            b' "input_size": [2, 1], "timings": {"decode": 1.0, "encoder": 12.5}, "buffers":'
            b' [{"name": "embedding", "dtype": "uint16", "shape": [2, 2, 2]}, {"name": "image",'
            b' "dtype": "uint8", "shape": [2, 2, 3]}]}',
            b"\x00\x00\x01\x00\x02\x00\x03\x00\x04\x00\x05\x00\x06\x00\x07\x00",
            bytes(range(12)),
        ],
    ),
    "masks": (
        MaskMessage(
            meta=GOLDEN_META,
            frame_size=(2, 4),
            tracks=(
                TrackRecord(1, (0.0, 0.0, 3.0, 2.0), 0.875, "tracked", 0, 0.5),
                TrackRecord(4, (1.0, 1.0, 2.0, 2.0), 0.25, "coasting", 3, 2.0),
            ),
            masks=(
                RegionMask((2, 4), (0, 0, 3, 2), GOLDEN_WINDOW),
                RegionMask((2, 4), (0, 0, 0, 0), np.zeros((0, 0), bool)),
            ),
            timings={
                "decode": 1.0,
                "encoder": 12.5,
                "tracker": 3.0,
                "publish": 0.5,
                "latency": 40.0,
            },
        ),
        [
            b'{"kind": "masks", "v": 2, "meta": {"stream_id": "cam0", "seq": 7, "frame_index": 9,'
            b' "pts": 27027, "time_base": [1, 30000], "capture_time": 1700000000.25, "session": 2,'
            b' "source_pts": 27000}, "frame_size": [2, 4], "tracks": [{"track_id": 1, "box": [0.0,'
            b' 0.0, 3.0, 2.0], "score": 0.875, "state": "tracked", "frames_since_update": 0,'
            b' "innovation": 0.5}, {"track_id": 4, "box": [1.0, 1.0, 2.0, 2.0], "score": 0.25,'
            b' "state": "coasting", "frames_since_update": 3, "innovation": 2.0}], "mask_windows":'
            b' [[0, 0, 3, 2], [0, 0, 0, 0]], "timings": {"decode": 1.0, "encoder": 12.5,'
            b' "tracker": 3.0, "publish": 0.5, "latency": 40.0}, "buffers": [{"name": "masks",'
            b' "dtype": "uint8", "shape": [1]}]}',
            b"\x84",
        ],
    ),
    "status": (
        StatusMessage(
            "decoder",
            "reconnecting",
            1700000002.0,
            {"frames": 10, "source_lost": 1},
            {
                "source_state": {"state": "reconnecting", "session": 1},
                "stats": {"median_ms": 1.5},
                "note": None,
            },
        ),
        [
            b'{"kind": "status", "v": 2, "node": "decoder", "state": "reconnecting", "time":'
            b' 1700000002.0, "counters": {"frames": 10, "source_lost": 1}, "detail":'
            b' {"source_state": {"state": "reconnecting", "session": 1}, "stats": {"median_ms":'
            b' 1.5}, "note": null}, "buffers": []}'
        ],
    ),
    "end": (
        EndOfStream("cam0", 10, "eof"),
        [
            b'{"kind": "end", "v": 2, "stream_id": "cam0", "frames": 10, "reason": "eof",'
            b' "buffers": []}'
        ],
    ),
}
GOLDEN_COMMAND = (
    PromptCommand(op="add", track_id=5, points=((1.0, 2.0), (3.5, 4.0)), labels=(1, 0), frame=120),
    b'{"op": "add", "track_id": 5, "box": null, "points": [[1.0, 2.0], [3.5, 4.0]], "labels":'
    b' [1, 0], "frame": 120}',
)
GOLDEN_REPLY = (  # the control protocol's listing changed: "id" became "track_id", "frame" came
    PromptReply(ok=True, frame=12, tracks=LISTING),
    b'{"ok": true, "error": null, "track_id": null, "frame": 12, "tracks": [{"track_id": 1,'
    b' "state": "tracked", "box": [0.0, 1.0, 5.0, 6.0], "score": 0.9, "frames_since_update": 0,'
    b' "pending": false, "start_frame": null}, {"track_id": 2, "state": "tentative", "box":'
    b' null, "score": 0.0, "frames_since_update": 0, "pending": true, "start_frame": 30}]}',
)


@pytest.mark.parametrize("kind", GOLDEN)
def test_golden_parts_decode_and_encode_unchanged(kind: str) -> None:
    msg, parts = GOLDEN[kind]
    assert_same(decode(parts), msg)
    assert [bytes(part) for part in encode(msg)] == parts


def test_golden_prompt_json_decodes_and_encodes_unchanged() -> None:
    for msg, data in (GOLDEN_COMMAND, GOLDEN_REPLY):
        assert type(msg).from_json(data) == msg
        assert msg.to_json() == data


def test_golden_headers_without_optional_fields_still_decode() -> None:
    """Older senders left out what later became optional: session, timings, source_pts."""
    header = json.loads(GOLDEN["frame"][1][0])
    for key in ("session", "source_pts"):
        del header["meta"][key]
    del header["timings"]
    got = decode([json.dumps(header).encode(), GOLDEN["frame"][1][1]])
    assert got.meta == msgspec.structs.replace(GOLDEN_META, session=0, source_pts=None)
    assert got.timings == {}
    status = json.loads(GOLDEN["status"][1][0])
    for key in ("counters", "detail", "buffers"):
        del status[key]
    assert decode([json.dumps(status).encode()]) == StatusMessage(
        "decoder", "reconnecting", 1700000002.0
    )


def test_readers_ignore_unknown_header_fields() -> None:
    header = json.loads(GOLDEN["masks"][1][0])
    header["future"] = {"anything": [1, 2]}
    header["meta"]["future"] = 1
    header["tracks"][0]["future"] = "x"
    assert_same(decode([json.dumps(header).encode(), GOLDEN["masks"][1][1]]), GOLDEN["masks"][0])


# --------------------------------------------------------------------- status states


@pytest.mark.parametrize("state", STATUS_STATES)
def test_every_status_state_round_trips(state: str) -> None:
    msg = StatusMessage("tracker", state, 1.0)
    assert decode(encode(msg)) == msg


def test_unknown_status_state_is_refused_by_sender_and_reader() -> None:
    with pytest.raises(MessageError, match="status state 'paused' not in"):
        StatusMessage("tracker", "paused", 1.0)
    header = b'{"kind": "status", "v": 2, "node": "n", "state": "paused", "time": 1.0}'
    with pytest.raises(MessageError, match=r"header: Invalid enum value 'paused' - at `\$.state`"):
        decode([header])
