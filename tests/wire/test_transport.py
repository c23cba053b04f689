"""Transport: endpoints, socket options, ipc files, receiving through malformed messages."""

from __future__ import annotations

import logging
import re
import socket
import time

import numpy as np
import pytest
import zmq

from pipeline.endpoints import validate_endpoint
from pipeline.wire.messages import FrameMessage, FrameMeta, StatusMessage
from pipeline.wire.transport import (
    MessageReceiver,
    SocketOptions,
    open_socket,
    send_message,
)

pytestmark = pytest.mark.timeout(30)

OPTIONS = SocketOptions(sndhwm=10, rcvhwm=10)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # closes every socket a failing test left open


def frame(seq: int) -> FrameMessage:
    meta = FrameMeta("cam0", seq, seq, seq, (1, 25), time.time())
    return FrameMessage(meta=meta, image=np.full((2, 3, 3), seq, np.uint8))


@pytest.mark.parametrize(
    "endpoint",
    [
        "ipc:///tmp/x/frames",
        "ipc://@abstract",
        "inproc://frames",
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:65535",
    ],
)
def test_valid_endpoints(endpoint: str) -> None:
    assert validate_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        "127.0.0.1:5555",
        "udp://127.0.0.1:5555",
        "ipc://",
        "inproc://",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:http",
        "tcp://:5555",
        "tcp://127.0.0.1:*",
    ],
)
def test_invalid_endpoints_are_named(endpoint: str) -> None:
    with pytest.raises(ValueError, match=f"bad (tcp )?endpoint {re.escape(repr(endpoint))}"):
        validate_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://127.0.0.1:1"])
def test_wildcard_binds_are_valid_and_quiet(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Whether an endpoint other hosts can reach is safe depends on CURVE keys: the launcher
    # warns once per endpoint (pipeline.wire.curve.exposure_warnings, tests/wire/test_curve.py), not
    # every socket that opens it.
    with caplog.at_level(logging.WARNING, logger="pipeline.wire.transport"):
        assert validate_endpoint(endpoint) == endpoint
    assert not caplog.records


def test_open_socket_sets_every_option(ctx: zmq.Context) -> None:
    options = SocketOptions(
        linger_ms=5, sndhwm=3, rcvhwm=4, maxmsgsize=1 << 20, sndtimeo_ms=100, rcvtimeo_ms=200
    )
    sock = open_socket(ctx, zmq.PULL, "inproc://opts", bind=True, options=options)
    assert sock.getsockopt(zmq.LINGER) == 5
    assert sock.getsockopt(zmq.SNDHWM) == 3
    assert sock.getsockopt(zmq.RCVHWM) == 4
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
    assert sock.getsockopt(zmq.SNDTIMEO) == 100
    assert sock.getsockopt(zmq.RCVTIMEO) == 200
    assert SocketOptions(sndhwm=1, rcvhwm=1).linger_ms == 0


def test_open_socket_refuses_bad_arguments(ctx: zmq.Context) -> None:
    with pytest.raises(ValueError, match="only for SUB"):
        open_socket(ctx, zmq.PUSH, "inproc://x", bind=True, options=OPTIONS, subscribe=b"")
    with pytest.raises(ValueError, match="only for binding"):
        open_socket(ctx, zmq.SUB, "tcp://*:5555", bind=False, options=OPTIONS)
    with pytest.raises(ValueError, match="bad endpoint"):
        open_socket(ctx, zmq.PUSH, "localhost:5555", bind=False, options=OPTIONS)


def test_sub_subscribes_to_its_prefix(ctx: zmq.Context) -> None:
    pub = open_socket(ctx, zmq.PUB, "inproc://feed", bind=True, options=OPTIONS)
    sub = open_socket(ctx, zmq.SUB, "inproc://feed", bind=False, options=OPTIONS, subscribe=b"B")
    deadline = time.monotonic() + 5
    while not sub.poll(10):  # the subscription reaches the publisher asynchronously
        assert time.monotonic() < deadline, "subscriber never received anything"
        pub.send(b"A")
        pub.send(b"B")
    assert sub.recv() == b"B"


def test_ipc_bind_creates_the_folder_and_replaces_a_stale_socket(ctx, tmp_path) -> None:
    path = tmp_path / "run" / "frames.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a dead process's socket file: bound, nobody listening
    stale.close()
    assert path.is_socket()
    pull = open_socket(ctx, zmq.PULL, f"ipc://{path}", bind=True, options=OPTIONS)
    push = open_socket(ctx, zmq.PUSH, f"ipc://{path}", bind=False, options=OPTIONS)
    send_message(push, frame(0))
    assert MessageReceiver(pull).recv(5000).meta.seq == 0

    nested = tmp_path / "a" / "b" / "c.sock"
    open_socket(ctx, zmq.PULL, f"ipc://{nested}", bind=True, options=OPTIONS)
    assert nested.is_socket()


def test_ipc_bind_refuses_a_socket_in_use_or_a_plain_file(ctx, tmp_path) -> None:
    path = tmp_path / "frames.sock"
    running = open_socket(ctx, zmq.PULL, f"ipc://{path}", bind=True, options=OPTIONS)
    with pytest.raises(OSError, match="in use by a running process"):
        open_socket(ctx, zmq.PULL, f"ipc://{path}", bind=True, options=OPTIONS)
    assert not running.closed
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(ValueError, match="not a socket"):
        open_socket(ctx, zmq.PULL, f"ipc://{plain}", bind=True, options=OPTIONS)
    assert plain.read_text() == "keep me"


@pytest.fixture
def pair(ctx: zmq.Context):
    # inproc delivers on send, so a test knows what is queued without waiting.
    pull = open_socket(ctx, zmq.PULL, "inproc://pair", bind=True, options=OPTIONS)
    push = open_socket(ctx, zmq.PUSH, "inproc://pair", bind=False, options=OPTIONS)
    return push, MessageReceiver(pull)


def test_receiver_skips_and_counts_malformed_messages(pair, caplog) -> None:
    push, receiver = pair
    push.send_multipart([b"{not json"])
    push.send_multipart([b'{"kind": "frame", "v": 99, "buffers": []}'])
    good = frame(3)
    push.send_multipart([*good.to_frames(), b"extra part"])
    send_message(push, good)
    with caplog.at_level(logging.WARNING, logger="pipeline.wire.transport"):
        got = receiver.recv(5000)
    assert isinstance(got, FrameMessage) and got.meta.seq == 3
    np.testing.assert_array_equal(got.image, good.image)
    assert receiver.rejected == 3
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 3
    assert "JSON is malformed" in reasons[0] and "schema version 99" in reasons[1]
    assert "3 part(s)" in reasons[2]


def test_receiver_times_out_with_none(pair) -> None:
    push, receiver = pair
    assert receiver.recv(0) is None
    start = time.monotonic()
    assert receiver.recv(50) is None
    assert time.monotonic() - start >= 0.04
    push.send_multipart([b"garbage"])  # only malformed input: still a timeout, counted
    assert receiver.recv(20) is None
    assert receiver.rejected == 1


def test_send_message_is_multipart_and_decodes(pair) -> None:
    push, receiver = pair
    status = StatusMessage("encoder", "running", 1.0, {"frames": 1}, {})
    send_message(push, status)
    assert receiver.recv(5000) == status
