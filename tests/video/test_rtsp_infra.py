"""The RTSP test infrastructure (tests/support/rtsp.py) against real PyAV reads.

These tests also pin down how PyAV/FFmpeg report each failure (see the notes at the top of
tests/support/rtsp.py): if an FFmpeg upgrade changes one, the test that fails names it.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from support.media import make_clip
from support.rtsp import (
    GSTREAMER_RTSP_MISSING,
    HOST,
    FreezeProxy,
    RtspServer,
    StallServer,
    free_port,
    gstreamer_rtsp_available,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not gstreamer_rtsp_available(), reason=GSTREAMER_RTSP_MISSING),
]

SIZE = (160, 120)
FPS = 25
CLIP_FRAMES = 250  # 10 s: longer than any test here streams
TCP = {"rtsp_transport": "tcp"}
RTP_TICKS_PER_FRAME = 90000 // FPS
TCP_STATES = {"05": "FIN_WAIT2", "0A": "LISTEN"}  # the two the restart test looks for


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rtsp") / "clip.mp4"
    return make_clip(path, frames=CLIP_FRAMES, size=SIZE, fps=FPS)


@pytest.fixture(scope="module")
def server(clip: Path) -> Iterator[RtspServer]:
    with RtspServer(clip) as running:
        yield running


def open_rtsp(url: str, read_timeout_s: float = 5.0) -> av.container.InputContainer:
    return av.open(url, options=TCP, timeout=(5.0, read_timeout_s))


def decode_some(packets: Iterator[av.Packet], count: int) -> list[av.VideoFrame]:
    """Decode ``count`` frames from ``packets``, leaving the rest of the demuxer to the test."""
    frames: list[av.VideoFrame] = []
    for packet in packets:
        frames += packet.decode()
        if len(frames) >= count:
            return frames
    raise AssertionError(f"the stream ended after {len(frames)} of {count} frames")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def socket_states(port: int) -> list[str]:
    """TCP states of the IPv4 sockets whose local port is ``port``, from /proc/net/tcp."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if int(local.split(":")[1], 16) == port:
            states.append(TCP_STATES.get(state, state))
    return states


def test_serves_the_clip_in_real_time(server: RtspServer) -> None:
    frames_wanted = 70
    with open_rtsp(server.url) as container:
        frames = []
        for frame in itertools.islice(container.decode(video=0), frames_wanted):
            frames.append((time.monotonic(), frame))
    assert len(frames) == frames_wanted
    assert {(f.width, f.height) for _, f in frames} == {SIZE}
    # Frame 0 comes without pts (see tests/support/rtsp.py); after it, one frame interval apart.
    pts = [f.pts for _, f in frames[1:]]
    assert [b - a for a, b in itertools.pairwise(pts)] == [RTP_TICKS_PER_FRAME] * (len(pts) - 1)
    # Paced at the file's rate, not pushed as fast as possible (the first frames may come
    # in a burst while FFmpeg probes the stream during open). A lower bound only: a busy
    # machine may read them later, never earlier.
    elapsed = frames[-1][0] - frames[20][0]
    assert elapsed >= 0.75 * (frames_wanted - 21) / FPS


def test_the_stream_ends_at_the_end_of_the_clip(tmp_path: Path) -> None:
    short = make_clip(tmp_path / "short.mp4", frames=30, size=SIZE, fps=FPS)
    with RtspServer(short) as server, open_rtsp(server.url) as container:
        frames = list(container.decode(video=0))  # ends by itself: a camera that hangs up
    assert len(frames) == 30


def test_testsrc_mode_needs_no_file() -> None:
    with RtspServer(testsrc="160x120@25") as server, open_rtsp(server.url) as container:
        frames = list(itertools.islice(container.decode(video=0), 10))
    assert len(frames) == 10
    assert {(f.width, f.height) for f in frames} == {SIZE}


def test_restart_on_the_same_port_leaves_nothing_behind(clip: Path) -> None:
    port = free_port()
    server = RtspServer(clip, port=port)
    processes = []
    fds = []
    with server:
        for cycle in range(4):
            assert server.process is not None
            processes.append(server.process)
            with open_rtsp(server.url) as container:
                packets = container.demux(video=0)
                frames = decode_some(packets, 5)
                assert {(f.width, f.height) for f in frames} == {SIZE}
                # Stopped mid-read, the server's close ends demux() quietly and at once.
                assert server.stop() == 0, server.stderr
                rest = list(packets)  # returns (a hang would be the test's timeout)
                assert rest[-1].size == 0
                # The client has not closed yet, so the old server's side of the connection
                # lingers in FIN_WAIT2 and a plain bind fails: a restart binding the port now
                # proves the server sets SO_REUSEADDR.
                assert "FIN_WAIT2" in socket_states(port)
                with socket.socket() as plain, pytest.raises(OSError, match="in use"):
                    plain.bind((HOST, port))
                if cycle < 3:
                    server.restart()
            assert server.port == port
            fds.append(open_fds())
    for process in processes:
        assert process.returncode == 0
        with pytest.raises(ChildProcessError):  # reaped: not even a zombie is left
            os.waitpid(process.pid, os.WNOHANG)
    assert server.process is None
    assert max(fds) <= fds[0] + 2, fds


def test_start_reports_why_the_server_failed() -> None:
    with pytest.raises(RuntimeError, match=r"exited with status 1 .*multiples of 8"):
        RtspServer(testsrc="161x120@25").start()


def test_silent_server_at_open_is_a_timeout_reported_as_invalid_data() -> None:
    threads = threading.active_count()
    with StallServer() as stall:
        started = time.monotonic()
        with pytest.raises(av.error.InvalidDataError, match="Invalid data found"):
            av.open(stall.url, options=TCP, timeout=(1.0, 1.0))
        elapsed = time.monotonic() - started
        assert stall.accepted == 1
    # The 1 s open timeout ended it (FFmpeg's own default waits for ever: a hang would be
    # ended by pytest-timeout instead).
    assert elapsed >= 0.9
    assert threading.active_count() == threads  # close() ended its thread


def test_freeze_mid_stream_raises_exit_error_after_two_read_timeouts(server: RtspServer) -> None:
    threads = threading.active_count()
    with FreezeProxy((HOST, server.port)) as proxy:
        with open_rtsp(proxy.url, read_timeout_s=1.0) as container:
            packets = container.demux(video=0)
            frames = decode_some(packets, 10)
            assert {(f.width, f.height) for f in frames} == {SIZE}
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(av.error.ExitError, match="Immediate exit requested"):
                for _ in packets:
                    pass
            elapsed = time.monotonic() - started
        assert elapsed >= 1.8  # two read timeouts (a hang: ended by pytest-timeout)

        # New connections get no answer while frozen either, and are served after thaw.
        with pytest.raises(av.error.InvalidDataError):
            av.open(proxy.url, options=TCP, timeout=(1.0, 1.0))
        proxy.thaw()
        with open_rtsp(proxy.url) as container:
            assert len(list(itertools.islice(container.decode(video=0), 5))) == 5
        assert proxy.accepted == 3
    assert threading.active_count() == threads  # close() ended all forwarding threads


def test_thaw_resumes_a_frozen_connection(server: RtspServer) -> None:
    # A hiccup shorter than the read timeout: the same connection carries on after it.
    with FreezeProxy((HOST, server.port)) as proxy, open_rtsp(proxy.url, 3.0) as container:
        frames = container.decode(video=0)
        list(itertools.islice(frames, 5))
        proxy.freeze()
        thaw = threading.Timer(0.5, proxy.thaw)
        thaw.start()
        arrivals = [time.monotonic()]
        for _ in itertools.islice(frames, 30):
            arrivals.append(time.monotonic())
        thaw.join()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) == 30
    assert max(gaps) >= 0.4
