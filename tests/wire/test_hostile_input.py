"""Hostile messages on a node's sockets: rejected and counted, the node unaffected."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.run.runtime import Node, NodeEndpoints, NodeRunner
from pipeline.wire.messages import (
    EndOfStream,
    FrameMessage,
    FrameMeta,
    MaskMessage,
    Message,
    PromptCommand,
    PromptReply,
    StatusMessage,
    encode,
)

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
    inputs = (FrameMessage,)

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


def test_a_command_the_node_fails_on_is_answered_and_serving_goes_on(running, caplog) -> None:
    """A bug in a node's handle_command (which runs in the control socket's thread) is
    answered with its text and logged; the next command is served as usual."""
    node, _, _, control, ctx = running

    def broken(command: PromptCommand) -> PromptReply:
        raise RuntimeError("handle_command is broken")

    node.handle_command = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="pipeline.run.runtime"):
        reply = _request(ctx, control, [b'{"op": "list"}'])
    assert reply is not None and reply["ok"] is False
    assert reply["error"] == "RuntimeError: handle_command is broken"
    assert any("a prompt command failed" in r.getMessage() for r in caplog.records)
    del node.handle_command
    assert _request(ctx, control, [b'{"op": "list"}'])["ok"] is True
    assert node.commands == ["list"]


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


# --------------------------------------------------------------------------- the tracker


@pytest.mark.timeout(600)
def test_embeddings_that_do_not_fit_the_run_are_rejected_and_counted(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real tracker node behind real sockets: stale frames (repeated, going back), a frame
    size that does not resize to the input size, an absurd one, a wrong-shaped or NaN
    embedding are each rejected before anything is allocated for them, counted by kind in
    the status, logged once per kind; the node lives on and the next good frame has masks."""
    from support.trackers import LiveTracker, embedding_message

    run = LiveTracker(checkpoint, tmp_path)
    try:
        run.wait_for(lambda: run.node.tracker is not None)
        assert run.command({"op": "add", "box": [10, 10, 60, 50]})["ok"]
        run.send(embedding_message(0))
        run.send(embedding_message(1))
        assert [m.meta.frame_index for m in run.masks(2)] == [0, 1]
        grid = 256 // 16
        nan = np.zeros((256, grid, grid), np.float16)
        nan[3, 4, 5] = np.nan
        hostile = [
            embedding_message(1),  # a repeat
            embedding_message(0),  # back in time
            embedding_message(0),  # and again: counted, not logged again
            # 6000x6000 claimed for the 192x256 input of a 128x96 frame at 256 px.
            embedding_message(5, original=(6000, 6000), input_size=(192, 256)),
            embedding_message(6, original=(20000, 20000), input_size=(256, 256)),
            embedding_message(7, embedding=np.zeros((256, 8, 8), np.float16)),
            embedding_message(8, embedding=nan),
        ]
        with caplog.at_level(logging.WARNING, logger="nodes.tracker"):
            for msg in hostile:
                run.send(msg)
            run.send(embedding_message(9))
            (good,) = run.masks(1)
        assert good.meta.frame_index == 9 and [t.track_id for t in good.tracks] == [1]
        assert not run.output.poll(200)  # nothing came for the rejected ones
        want = {
            "stale_frame": 3,
            "inconsistent_size": 1,
            "absurd_size": 1,
            "embedding_shape": 1,
            "non_finite": 1,
        }
        status = run.latest_status()
        assert status["state"] == "running"
        assert status["detail"]["rejected"] == want
        assert status["counters"]["embeddings_rejected"] == len(hostile)
        logged = [r.getMessage() for r in caplog.records if "embedding rejected" in r.getMessage()]
        assert len(logged) == len(want)  # once per kind
        assert any("6000x6000" in line and "(192, 256)" in line for line in logged)
        assert run.command({"op": "list"})["ok"]  # still serving
        print(f"tracker: {len(hostile)} bad embeddings rejected {want}, the run went on")
    finally:
        run.close()


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "float32"])
def test_the_finiteness_check_reads_every_wire_dtype(wire: str) -> None:
    import torch

    from nodes.tracker import _all_finite
    from pipeline.infer.embedding_codec import embedding_to_wire

    values = torch.tensor([[[0.0, -1.5], [3.0e4, -6.0e-5]]])  # finite in every wire dtype
    assert _all_finite(embedding_to_wire(values, wire), wire)
    for bad in (math.nan, math.inf, -math.inf):
        spoilt = values.clone()
        spoilt[0, 1, 0] = bad
        assert not _all_finite(embedding_to_wire(spoilt, wire), wire), (wire, bad)


def test_messages_of_a_kind_the_node_does_not_take_are_counted_and_dropped(running) -> None:
    """A peer on the wrong link (or a hostile one) sends a well-formed message of another
    kind: the runtime drops it before the node sees it, and counts it."""
    node, _, inputs, _, ctx = running
    status = StatusMessage(node="encoder", state="running", time=0.0)
    end_of_other = EndOfStream(stream_id="cam0", frames=1, reason="eof")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(inputs)
    wrong = MaskMessage(meta=_frame(5).meta, frame_size=(4, 4), tracks=(), masks=())
    push.send_multipart(encode(wrong), copy=False)
    push.send_multipart(encode(_frame(6)), copy=False)
    push.send_multipart(encode(status), copy=False)  # relayed on, never processed
    push.send_multipart(encode(end_of_other), copy=False)
    push.close()
    deadline = threading.Event()
    for _ in range(200):
        if node.frames == [6]:
            break
        deadline.wait(0.05)
    assert node.frames == [6]
    assert node.counters["wrong_kind_messages"] == 1
