"""Hostile messages on a node's sockets: rejected and counted, the node unaffected."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.messages import (
    EndOfStream,
    FrameMessage,
    FrameMeta,
    Message,
    PromptCommand,
    PromptReply,
    encode,
)
from pipeline.runtime import Node, NodeEndpoints, NodeRunner

# What broke a run before (issue 11), and more of the same kind.
HOSTILE_PARTS: list[list[bytes]] = [
    [b"[" * 200_000 + b"]" * 200_000],  # nested too deep for Python's parser
    [b'{"kind": "frame", "v": 1, "n": ' + b"1" * 5000 + b"}"],  # past the int-digit limit
    [b"\xff\xfe not utf-8"],
    [b"{" + b'"a": 1, ' * 200_000 + b'"b": 2}'],  # larger than any header
    [b'{"kind": "nonsense", "v": 1}'],
    [b"null"],
    [b'{"kind": "frame", "v": 1}', b"\x00" * 10],  # a frame without its fields
]


class Recorder(Node):
    """Takes frames and prompt commands, and remembers them."""

    name = "tracker"

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[int] = []
        self.commands: list[str] = []

    def process(self, msg: Message) -> list[Message]:
        if isinstance(msg, FrameMessage):
            self.frames.append(msg.meta.seq)
        return []

    def handle_command(self, command: PromptCommand) -> PromptReply:
        self.commands.append(command.op)
        return PromptReply(ok=True, error=None, track_id=None, tracks=())


def _frame(seq: int) -> FrameMessage:
    meta = FrameMeta(
        stream_id="cam0", seq=seq, frame_index=seq, pts=seq, time_base=(1, 25), capture_time=0.0
    )
    return FrameMessage(meta=meta, image=np.zeros((4, 4, 3), np.uint8))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Recorder, NodeRunner, str, str, zmq.Context]]:
    ctx = zmq.Context()
    node = Recorder()
    inputs, control = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/control"
    runner = NodeRunner(
        node, NodeEndpoints(input=inputs, control=control), context=ctx, max_message_bytes=1 << 22
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runner.run()), daemon=True)
    thread.start()
    yield node, runner, inputs, control, ctx
    runner.stop.set()
    thread.join(10)
    assert not thread.is_alive() and codes == [0], "the node did not survive"
    ctx.term()


def _request(
    ctx: zmq.Context, endpoint: str, parts: list[bytes], timeout_ms: int = 10_000
) -> dict | None:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(parts)
        if not sock.poll(timeout_ms):
            return None
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


def test_hostile_prompt_commands_get_an_error_reply(running) -> None:
    node, _, _, control, ctx = running
    tried = [*HOSTILE_PARTS, [b'{"op": "list"}', b"second part"]]
    replied = 0
    for parts in tried:
        oversized = sum(map(len, parts)) > 1 << 20
        reply = _request(ctx, control, parts, timeout_ms=1500 if oversized else 10_000)
        if oversized:
            # Past the control socket's MAXMSGSIZE ZeroMQ drops the connection unread: no
            # reply, nothing parsed, nothing allocated for it.
            assert reply is None
            continue
        assert reply is not None and reply["ok"] is False, parts[0][:40]
        assert reply["error"]
        replied += 1
    assert _request(ctx, control, [b'{"op": "list"}'])["ok"] is True  # still serving
    assert node.commands == ["list"]
    assert node.counters["bad_commands"] == replied == len(tried) - 1
    print(f"control socket: {len(tried)} hostile commands refused, node alive")


def test_hostile_messages_on_the_input_are_rejected_and_counted(running) -> None:
    node, runner, inputs, _, ctx = running
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(inputs)
    push.send_multipart(encode(_frame(0)), copy=False)
    for parts in HOSTILE_PARTS:
        push.send_multipart(parts)
    push.send_multipart(encode(_frame(1)), copy=False)
    push.send_multipart(encode(EndOfStream(stream_id="cam0", frames=2, reason="eof")))
    push.close()
    deadline = threading.Event()
    for _ in range(200):  # until the end marker was handled
        if node.frames == [0, 1]:
            break
        deadline.wait(0.05)
    assert node.frames == [0, 1]
    assert runner._sockets.input is not None
    assert runner._sockets.input.rejected == len(HOSTILE_PARTS)
    print(f"input socket: {len(HOSTILE_PARTS)} hostile messages rejected, frames went on")
