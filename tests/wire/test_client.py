"""MaskSubscriber over a real PUB/SUB pair: order, gaps, status, end of stream, timeouts."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import zmq

from pipeline.wire.client import MaskFrame, MaskSubscriber
from pipeline.wire.messages import EndOfStream, FrameMeta, MaskMessage, StatusMessage, TrackRecord
from pipeline.wire.transport import send_message

pytestmark = pytest.mark.timeout(30)


def mask_message(seq: int, stream_id: str = "cam0", n: int = 2) -> MaskMessage:
    meta = FrameMeta(stream_id, seq, seq, seq * 40, (1, 1000), time.time())
    tracks = tuple(TrackRecord(i, (0.0, 0.0, 3.0, 2.0), 0.9, "tracked", 0, 0.0) for i in range(n))
    masks = np.zeros((n, 4, 5), bool)
    masks[:, seq % 4, :] = True  # differs per seq, so a mix-up shows
    return MaskMessage(meta=meta, frame_size=(4, 5), tracks=tracks, masks=masks)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def feed(ctx: zmq.Context):
    """A bound PUB socket and a MaskSubscriber that has joined it."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = MaskSubscriber(f"tcp://127.0.0.1:{port}", timeout_ms=5000, context=ctx)
    # Slow joiner: until the subscription reaches the publisher, PUB drops everything.
    # Heartbeat until one arrives (status messages are not yielded, so they cannot leak
    # into what the tests count).
    deadline = time.monotonic() + 10
    while sub.last_status is None:
        assert time.monotonic() < deadline, "subscriber never joined"
        send_message(pub, StatusMessage("publisher", "starting", time.time()))
        sub.recv(20)
    yield pub, sub
    sub.close()


def test_every_frame_in_order(feed) -> None:
    pub, sub = feed
    sent = [mask_message(seq) for seq in range(10)]
    for msg in sent:
        send_message(pub, msg)
    send_message(pub, EndOfStream("cam0", frames=10, reason="eof"))
    frames = list(sub)
    assert [f.seq for f in frames] == list(range(10))
    assert all(isinstance(f, MaskFrame) and f.gap == 0 for f in frames)
    assert sub.missed == 0
    for got, msg in zip(frames, sent, strict=True):
        np.testing.assert_array_equal(got.masks, msg.dense_masks())
        assert got.masks.dtype == np.bool_ and got.masks.shape == (2, 4, 5)
        assert got.masks is got.masks  # built once, on first access
        assert got.tracks == msg.tracks and got.frame_size == (4, 5)
        assert got.stream_id == "cam0" and got.frame_index == got.seq
        assert got.time_seconds == pytest.approx(got.seq * 0.04)
        assert got.capture_time == msg.meta.capture_time
        assert 0 <= got.latency_s < 5
    assert sub.last_end == EndOfStream("cam0", frames=10, reason="eof")


def test_frames_give_the_compact_windows_too(feed) -> None:
    """Each mask also comes as the window that holds it: a small object on a large frame
    is its window's pixels; ``masks`` is the full frames, built from the windows."""
    pub, sub = feed
    dense = np.zeros((2, 480, 640), bool)
    dense[0, 100:103, 200:210] = True
    dense[0, 101, 205] = False
    tracks = tuple(TrackRecord(i, (0.0, 0.0, 3.0, 2.0), 0.9, "tracked", 0, 0.0) for i in (1, 2))
    meta = FrameMeta("cam0", 0, 0, 0, (1, 1000), time.time())
    send_message(pub, MaskMessage(meta=meta, frame_size=(480, 640), tracks=tracks, masks=dense))
    got = sub.recv(5000)
    assert got is not None
    one, empty = got.regions
    assert one.box == (200, 100, 210, 103) and one.window.shape == (3, 10)
    assert one.window.sum() == 29 and not one.window[1, 5]
    assert empty.box == (0, 0, 0, 0) and not empty.any()
    assert np.array_equal(got.masks, dense) and got.masks.shape == (2, 480, 640)


def test_gaps_are_reported_and_counted(feed, caplog) -> None:
    pub, sub = feed
    for seq, stream in [(0, "a"), (1, "a"), (0, "b"), (4, "a"), (1, "b"), (5, "a"), (9, "a")]:
        send_message(pub, mask_message(seq, stream))
    send_message(pub, EndOfStream("a", frames=10, reason="stopped"))
    with caplog.at_level(logging.WARNING, logger="pipeline.wire.client"):
        frames = list(sub)
    assert [(f.stream_id, f.seq, f.gap) for f in frames] == [
        ("a", 0, 0),
        ("a", 1, 0),
        ("b", 0, 0),
        ("a", 4, 2),
        ("b", 1, 0),
        ("a", 5, 0),
        ("a", 9, 3),
    ]
    assert sub.missed == 5
    assert "missed 2 message(s) before seq 4" in caplog.text


def test_status_is_kept_and_skipped(feed) -> None:
    pub, sub = feed
    send_message(pub, mask_message(0))
    send_message(pub, StatusMessage("tracker", "degraded", time.time(), {"coasting": 1}))
    send_message(pub, mask_message(1))
    send_message(pub, EndOfStream("cam0", frames=2, reason="eof"))
    assert [f.seq for f in sub] == [0, 1]
    assert sub.last_status.node == "tracker" and sub.last_status.state == "degraded"


def test_timeout_raises(feed) -> None:
    _, sub = feed
    sub.timeout_ms = 100
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="100 ms"):
        next(iter(sub))
    assert time.monotonic() - start >= 0.09


def test_recv_returns_frames_and_outlives_streams(feed) -> None:
    pub, sub = feed
    assert sub.recv(50) is None
    send_message(pub, mask_message(7))
    send_message(pub, EndOfStream("cam0", frames=8, reason="eof"))
    send_message(pub, mask_message(0, n=0))  # the stream restarts: seq 0 is no gap
    assert sub.recv(5000).seq == 7
    got = sub.recv(5000)
    assert got.seq == 0 and got.gap == 0 and got.masks.shape == (0, 4, 5) and got.tracks == ()
    assert sub.last_end.frames == 8
    assert sub.missed == 0


def test_malformed_messages_are_counted_not_fatal(feed) -> None:
    pub, sub = feed
    pub.send_multipart([b"not a header", b"\0"])
    send_message(pub, mask_message(0))
    assert sub.recv(5000).seq == 0
    assert sub.rejected == 1


def test_default_context_and_context_manager(ctx: zmq.Context) -> None:
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    with MaskSubscriber(f"tcp://127.0.0.1:{port}") as sub:
        assert sub.recv(0) is None
    assert sub._connection.socket.closed
