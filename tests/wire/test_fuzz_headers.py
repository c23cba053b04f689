"""Fuzzing the wire parser: random JSON and mutated real messages never get past ``decode``
or ``PromptCommand.from_json`` as anything but a message or a ``MessageError``.

Seeded (a failure reproduces), bounded by a case count and a time cap. The cases: random
JSON documents; real headers of every kind with one field replaced by random JSON, one field
dropped, or a field added; byte-level mutations of real headers; real messages with their
buffer parts dropped, doubled or truncated. Then the same kinds of cases on a running node's
input and control sockets and on a subscriber: each one rejected and counted, the node and the
subscriber going on.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.run.runtime import Node, NodeEndpoints, NodeRunner
from pipeline.wire.client import MaskSubscriber
from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import (
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

CASES = 3000
TIME_CAP_S = 30.0


def _meta(seq: int = 3) -> FrameMeta:
    return FrameMeta(
        stream_id="cam0",
        seq=seq,
        frame_index=seq,
        pts=seq * 40,
        time_base=(1, 1000),
        capture_time=1.7e9,
    )


def real_messages() -> list[Message]:
    """One message of every kind, as the nodes build them."""
    meta = _meta()
    window = np.zeros((3, 5), dtype=bool)
    window[1, 1:4] = True
    track = TrackRecord(
        track_id=7,
        box=(2.0, 1.0, 6.0, 4.0),
        score=0.9,
        state="tracked",
        frames_since_update=0,
        innovation=0.5,
    )
    return [
        FrameMessage(meta=meta, image=np.zeros((8, 10, 3), np.uint8), timings={"decode": 1.0}),
        EmbeddingMessage(
            meta=meta,
            embedding=np.zeros((4, 2, 2), np.float16),
            embedding_dtype="float16",
            original_size=(8, 10),
            input_size=(26, 32),
            timings={"decode": 1.0, "encoder": 9.0},
        ),
        MaskMessage(
            meta=meta,
            frame_size=(8, 10),
            tracks=(track,),
            masks=(RegionMask((8, 10), (1, 1, 6, 4), window),),
            timings={"tracker": 2.0},
        ),
        StatusMessage(
            node="encoder",
            state="running",
            time=1.7e9,
            counters={"frames": 3},
            detail={"backend": {"name": "torch"}},
        ),
        EndOfStream(stream_id="cam0", frames=4, reason="eof"),
    ]


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value: deep nesting, huge and negative numbers, odd strings."""
    kinds = ["int", "float", "str", "bool", "null", "list", "dict"] if depth < 6 else ["int"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**300, rng.randint(-999, 999)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-308, 3.0, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return rng.choice(
            [
                "",
                "frame",
                "masks",
                "uint8",
                "float32",
                "\u0000",
                "\ud7ff" * 3,
                "x" * rng.randint(0, 300),
            ]
        )
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(
            ["kind", "v", "buffers", "meta", "shape", "dtype", "name", "seq", "x"]
        ): random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def _paths(obj: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (keys / indices) into a JSON document."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _paths(value, (*prefix, index))


def _mutated(header: dict, rng: random.Random) -> dict:
    doc = json.loads(json.dumps(header))
    path = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(["replace", "drop", "add"])
    if action == "replace":
        parent[path[-1]] = random_json(rng)
    elif action == "drop":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[f"extra{rng.randint(0, 9)}"] = random_json(rng)
    else:
        parent.append(random_json(rng))
    return doc


def fuzz_cases(rng: random.Random, count: int) -> Iterator[list[bytes]]:
    """Multipart messages, each malformed or odd in one way."""
    real = [[bytes(p) for p in encode(m)] for m in real_messages()]
    for _ in range(count):
        parts = rng.choice(real)
        header = json.loads(parts[0])
        pick = rng.random()
        if pick < 0.15:
            yield [json.dumps(random_json(rng)).encode(), *parts[1:]]
        elif pick < 0.65:
            yield [json.dumps(_mutated(header, rng)).encode(), *parts[1:]]
        elif pick < 0.8:
            raw = bytearray(parts[0])
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            yield [bytes(raw), *parts[1:]]
        else:
            buffers = list(parts[1:])
            choice = rng.choice(["drop", "double", "truncate", "extra"])
            if choice == "drop" and buffers:
                buffers.pop(rng.randrange(len(buffers)))
            elif choice == "double" and buffers:
                buffers.append(buffers[-1])
            elif choice == "truncate" and buffers:
                i = rng.randrange(len(buffers))
                buffers[i] = buffers[i][: rng.randrange(max(1, len(buffers[i])))]
            else:
                buffers.append(b"\x00" * rng.randint(0, 64))
            yield [parts[0], *buffers]


def _decode_or_reject(parts: list[bytes]) -> Message | None:
    try:
        return decode(parts)
    except MessageError:
        return None


def _is_end(parts: list[bytes]) -> bool:
    return isinstance(_decode_or_reject(parts), EndOfStream)


def test_decode_takes_every_fuzzed_message_or_rejects_it() -> None:
    rng = random.Random(20261201)
    started, tried, rejected = time.monotonic(), 0, 0
    for parts in fuzz_cases(rng, CASES):
        # Anything but a MessageError propagates and fails the test, with the case.
        try:
            msg = _decode_or_reject(parts)
        except Exception as err:
            pytest.fail(f"{type(err).__name__}: {err} for header {parts[0][:300]!r}")
        tried += 1
        rejected += msg is None
        if msg is not None:
            # What decodes is a whole message: it encodes again and decodes to the same.
            again = decode([bytes(p) for p in encode(msg)])
            assert type(again) is type(msg)
        if time.monotonic() - started > TIME_CAP_S:
            break
    print(f"parser fuzz: {tried} cases, {rejected} rejected, {tried - rejected} valid")
    assert tried >= 200 and rejected > tried // 2


def test_prompt_parser_takes_every_fuzzed_command_or_rejects_it() -> None:
    rng = random.Random(7)
    base = {
        "op": "add",
        "track_id": 3,
        "box": [1, 2, 30, 40],
        "points": [[5, 6]],
        "labels": [1],
        "frame": 2,
    }
    tried = 0
    started = time.monotonic()
    for i in range(CASES):
        doc = random_json(rng) if i % 4 == 0 else _mutated(base, rng)
        data = json.dumps(doc).encode()
        try:
            PromptCommand.from_json(data)
        except MessageError:
            pass
        except Exception as err:
            pytest.fail(f"{type(err).__name__}: {err} for command {data[:300]!r}")
        tried += 1
        if time.monotonic() - started > TIME_CAP_S:
            break
    print(f"prompt fuzz: {tried} commands")


class Recorder(Node):
    """Counts frames and commands; a real node runner around it does the rest."""

    name = "tracker"
    inputs = (FrameMessage,)

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[int] = []

    def process(self, msg: Message) -> list[Message]:
        if isinstance(msg, FrameMessage):
            self.frames.append(msg.meta.seq)
        return []

    def handle_command(self, command: PromptCommand) -> PromptReply:
        return PromptReply(ok=True, error=None, track_id=None, tracks=())


def _wait(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


def test_fuzz_on_a_running_nodes_sockets(tmp_path: Path) -> None:
    """Fuzzed messages into a node's input and control sockets: each rejected or handled,
    the node alive and taking a real frame afterwards."""
    ctx = zmq.Context()
    node = Recorder()
    inputs, control = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/control"
    runner = NodeRunner(
        node, NodeEndpoints(input=inputs, control=control), context=ctx, max_message_bytes=1 << 22
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.run()), daemon=True)
    thread.start()
    try:
        # An end marker would end the node's stream: the end is tested elsewhere.
        cases = [c for c in fuzz_cases(random.Random(11), 400) if not _is_end(c)]
        invalid = sum(_decode_or_reject(parts) is None for parts in cases)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(inputs)
        for parts in cases:
            push.send_multipart(parts)
        push.send_multipart(
            encode(FrameMessage(meta=_meta(99), image=np.zeros((4, 4, 3), np.uint8)))
        )
        _wait("the real frame after the fuzz", lambda: 99 in node.frames, 60)
        assert runner._sockets.input is not None
        assert runner._sockets.input.rejected == invalid
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(control)
        rng = random.Random(5)
        for _ in range(100):
            req.send(json.dumps(random_json(rng)).encode())
            assert req.poll(10_000), "the control socket stopped answering"
            reply = json.loads(req.recv())
            assert isinstance(reply.get("ok"), bool)
        req.send(b'{"op": "list"}')
        assert req.poll(10_000) and json.loads(req.recv())["ok"] is True
        req.close()
        push.close()
        print(f"node fuzz: {len(cases)} input messages ({invalid} rejected), 100 commands")
    finally:
        runner.stop.set()
        thread.join(10)
        ctx.term()
    assert codes == [0], "the node did not survive the fuzz"


def test_fuzz_on_a_subscriber(tmp_path: Path) -> None:
    """A hostile or broken publisher cannot crash a MaskSubscriber: it skips and counts."""
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/feed"
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    cases = [c for c in fuzz_cases(random.Random(13), 300) if not _is_end(c)]
    invalid = sum(_decode_or_reject(parts) is None for parts in cases)
    with MaskSubscriber(endpoint, timeout_ms=200, context=ctx) as sub:
        events: list[object] = []
        probe = real_messages()[2]

        def joined() -> bool:  # PUB drops until the subscription arrives
            pub.send_multipart(encode(probe))
            with_event = sub.recv_event(50)
            if with_event is not None:
                events.append(with_event)
            return bool(events)

        _wait("the subscription", joined, 30)
        before = sub.rejected
        for parts in cases:
            pub.send_multipart(parts)
        pub.send_multipart(encode(EndOfStream(stream_id="final", frames=1, reason="eof")))

        def drained() -> bool:
            try:
                sub.recv_event(100)
            except TimeoutError:
                pass
            return sub.last_end is not None and sub.last_end.stream_id == "final"

        _wait("the end marker after the fuzz", drained, 60)
        assert sub.rejected - before == invalid
    pub.close()
    ctx.term()
