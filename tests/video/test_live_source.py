"""Live sources against real RTSP endpoints: credentials kept secret, stalls detected, and
`LiveSource` reconnecting with back-off while frame numbers and timestamps stay monotonic.

The RTSP tests use tests/support/rtsp.py (a GStreamer server that can be stopped and restarted, a
silent server, a freezable proxy) and are skipped where GStreamer's RTSP server is missing.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.media import damage_packets, make_clip
from support.rtsp import (
    GSTREAMER_RTSP_MISSING,
    HOST,
    FreezeProxy,
    RtspServer,
    StallServer,
    free_port,
    gstreamer_rtsp_available,
)

from pipeline.config import DecoderConfig
from pipeline.video.live_source import (
    FIRST_OPEN_ATTEMPTS,
    Backoff,
    LiveSource,
    SourceEvent,
    spec_for,
)
from pipeline.video.sources import (
    RTSP_PASSWORD_ENV,
    RTSP_USER_ENV,
    DecodedFrame,
    SourceError,
    SourceStalled,
    VideoSource,
    check_device,
    parse_source,
    redact,
)

pytestmark = pytest.mark.timeout(60)

SIZE = (160, 120)
FPS = 25
READ_TIMEOUT_S = 1.0
OPEN_TIMEOUT_S = 2.0
BACKOFF = Backoff(0.2, 0.5)
MISSING_WEBCAM = "/dev/video57"


def needs_rtsp() -> None:
    if not gstreamer_rtsp_available():
        pytest.skip(GSTREAMER_RTSP_MISSING)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("live") / "clip.mp4"
    # 60 s, served once: longer than any test streams, so the clip's end is never a "lost".
    return make_clip(path, frames=60 * FPS, size=SIZE, fps=FPS)


@pytest.fixture
def server(clip: Path) -> Iterator[RtspServer]:
    """An RTSP server of the clip, for this test alone (tests stop and restart it)."""
    needs_rtsp()
    with RtspServer(clip) as running:
        yield running


class Recorder:
    """Reads a LiveSource in the test's thread, recording frames and events with the time."""

    def __init__(self) -> None:
        self.frames: list[DecodedFrame] = []
        self.events: list[tuple[float, SourceEvent]] = []
        self._iter: Iterator[DecodedFrame | None] | None = None

    def on_event(self, event: SourceEvent) -> None:
        self.events.append((time.monotonic(), event))

    def source(self, url: str, **kwargs: object) -> LiveSource:
        settings: dict = {
            "open_timeout_s": OPEN_TIMEOUT_S,
            "read_timeout_s": READ_TIMEOUT_S,
            "backoff": BACKOFF,
            **kwargs,
        }
        live = LiveSource(parse_source(url), on_event=self.on_event, **settings)
        self._iter = iter(live)
        return live

    def of(self, state: str) -> list[tuple[float, SourceEvent]]:
        return [(at, event) for at, event in self.events if event.state == state]

    def pump(self, until: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Read until ``until()``; fail after ``timeout_s``. Each read returns within a
        frame interval, a tick (0.1 s) or a timeout, so the deadline is kept."""
        assert self._iter is not None
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                states = [(e.state, e.session, e.attempt) for _, e in self.events]
                raise AssertionError(f"no {what} within {timeout_s:g} s; events: {states}")
            item = next(self._iter)
            if item is not None:
                self.frames.append(item)

    def frames_of(self, session: int) -> list[DecodedFrame]:
        return [f for f in self.frames if f.meta.session == session]


# -- redaction and credentials ----------------------------------------------------------------


def test_redact_masks_the_password_and_the_url() -> None:
    url = "rtsp://admin:s3cret@cam.local:554/live"
    text = f"cannot open {url}: auth failed for password s3cret (quoted s3cret)"
    redacted = redact(text, url)
    assert "s3cret" not in redacted
    assert "rtsp://admin:***@cam.local:554/live" in redacted
    assert redact("plain text", url) == "plain text"
    # Without a password nothing is masked.
    assert redact(f"x {url}", "rtsp://cam.local/live") == f"x {url}"
    # A percent-encoded password is masked in that form too.
    quoted_url = "rtsp://admin:p%40ss@cam/live"
    assert "p%40ss" not in redact(f"error: {quoted_url}", quoted_url)


def test_display_name_keeps_ipv6_brackets() -> None:
    spec = parse_source("rtsp://user:pw@[::1]:8554/stream")
    assert spec.display_name == "rtsp://user:***@[::1]:8554/stream"


def test_env_credentials_go_into_the_url_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RTSP_USER_ENV, "alice")
    monkeypatch.setenv(RTSP_PASSWORD_ENV, "p@ss:w/rd")
    spec = parse_source("rtsp://cam.local:554/stream")
    assert spec.url == "rtsp://alice:p%40ss%3Aw%2Frd@cam.local:554/stream"
    assert spec.display_name == "rtsp://alice:***@cam.local:554/stream"
    for shown in (spec.display_name, repr(spec), str(spec)):
        assert "p@ss" not in shown and "p%40ss" not in shown, shown
    assert spec.options == {"rtsp_transport": "tcp"}
    # The URL's own credentials win over the environment's.
    own = parse_source("rtsp://bob:hunter2@cam.local/stream")
    assert own.url == "rtsp://bob:hunter2@cam.local/stream"
    assert own.display_name == "rtsp://bob:***@cam.local/stream"
    assert "hunter2" not in repr(own)
    # Other kinds never get them.
    assert parse_source("lavfi:testsrc2").url == "testsrc2"
    assert parse_source("/dev/video0").url == "/dev/video0"


def test_env_user_without_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RTSP_USER_ENV, "viewer")
    monkeypatch.delenv(RTSP_PASSWORD_ENV, raising=False)
    assert parse_source("rtsp://cam/s").url == "rtsp://viewer@cam/s"
    # A password alone (no user) is not used.
    monkeypatch.delenv(RTSP_USER_ENV)
    monkeypatch.setenv(RTSP_PASSWORD_ENV, "secret")
    assert parse_source("rtsp://cam/s").url == "rtsp://cam/s"


def test_refused_connection_error_hides_the_password() -> None:
    url = f"rtsp://user:hunter2@{HOST}:{free_port()}/stream"
    with pytest.raises(SourceError, match="connection refused") as info:
        VideoSource(parse_source(url), open_timeout_s=OPEN_TIMEOUT_S).open()
    assert not isinstance(info.value, SourceStalled)  # refused at once, not timed out
    message = str(info.value)
    assert "hunter2" not in message
    assert "rtsp://user:***@127.0.0.1" in message


# -- webcams (none on this machine) -----------------------------------------------------------


def test_check_device_names_the_missing_device() -> None:
    if os.path.exists(MISSING_WEBCAM):
        pytest.skip(f"{MISSING_WEBCAM} exists here")
    with pytest.raises(SourceError, match=rf"webcam '{MISSING_WEBCAM}' does not exist"):
        check_device(MISSING_WEBCAM)
    check_device("/dev/null")  # an existing node passes


@pytest.mark.parametrize("source", [MISSING_WEBCAM, "57"])
def test_missing_webcam_fails_fast_with_its_name(source: str) -> None:
    if os.path.exists(MISSING_WEBCAM):
        pytest.skip(f"{MISSING_WEBCAM} exists here")
    spec = parse_source(source)
    assert (spec.kind, spec.url, spec.format) == ("webcam", MISSING_WEBCAM, "v4l2")
    # Named by the device check before any open (no timeout is waited for).
    with pytest.raises(SourceError, match=rf"'{MISSING_WEBCAM}' does not exist") as info:
        VideoSource(spec, open_timeout_s=5.0, read_timeout_s=1.0).open()
    assert not isinstance(info.value, SourceStalled)
    # LiveSource: the first open is not retried.
    recorder = Recorder()
    recorder.source(source)
    with pytest.raises(SourceError, match=MISSING_WEBCAM):
        recorder.pump(lambda: False, 5.0, "error")
    assert recorder.events == []


# -- VideoSource timeouts over RTSP ---------------------------------------------------------------


def test_frozen_stream_raises_source_stalled(server: RtspServer) -> None:
    with FreezeProxy((HOST, server.port)) as proxy:
        source = VideoSource(
            parse_source(proxy.url), open_timeout_s=OPEN_TIMEOUT_S, read_timeout_s=READ_TIMEOUT_S
        )
        with source:
            frames = iter(source)
            got = list(itertools.islice(frames, 5))
            assert [f.image.shape for f in got] == [(SIZE[1], SIZE[0], 3)] * 5
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(SourceStalled, match="stalled") as info:
                for _ in frames:
                    pass
            elapsed = time.monotonic() - started
    assert elapsed >= 0.5 * READ_TIMEOUT_S  # it waited for the read timeout (no upper bound:
    # a busy machine may take longer to notice; the error says which timeout ended it)
    assert proxy.url in str(info.value)


def test_silent_server_at_open_is_a_stall() -> None:
    needs_rtsp()
    with StallServer() as stall:
        started = time.monotonic()
        with pytest.raises(SourceStalled, match="open timeout of 1 s"):
            VideoSource(parse_source(stall.url), open_timeout_s=1.0, read_timeout_s=1.0).open()
        elapsed = time.monotonic() - started
        assert stall.accepted == 1
    assert elapsed >= 0.9  # the open timeout was waited for; the message names it


def test_a_damaged_stream_fails_with_the_password_hidden(clip: Path, tmp_path: Path) -> None:
    # A camera whose stream turns to garbage after a few frames: the decoder fails on
    # every packet, and the error that ends the source names it without the password.
    needs_rtsp()
    damaged = damage_packets(clip, tmp_path / "damaged.mp4", set(range(3, 10_000)))
    with RtspServer(damaged) as server:
        url = server.url.replace("rtsp://", "rtsp://user:hunter2@")
        with VideoSource(
            parse_source(url),
            max_consecutive_errors=3,
            open_timeout_s=OPEN_TIMEOUT_S,
            read_timeout_s=READ_TIMEOUT_S,
        ) as source:
            with pytest.raises(SourceError, match="3 corrupt packets in a row") as info:
                list(itertools.islice(source, 20))
    assert source.corrupt_packets == 3
    assert "hunter2" not in str(info.value)
    assert "rtsp://user:***@" in str(info.value)


# -- Backoff, SourceEvent ---------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [BACKOFF.delay(n) for n in range(1, 6)] == [0.2, 0.4, 0.5, 0.5, 0.5]
    default = Backoff()
    assert [default.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert Backoff(1.0, 1.0).delay(1) == 1.0
    # Days of outage: attempt numbers in the tens of thousands still give the cap.
    assert default.delay(100_000) == 2.0


def test_source_event_json() -> None:
    event = SourceEvent(
        "reconnecting", 2, attempt=3, next_try_in_s=0.4, down_s=1.23456, error="gone"
    )
    assert event.to_json() == {
        "state": "reconnecting",
        "session": 2,
        "attempt": 3,
        "next_try_in_s": 0.4,
        "down_s": 1.235,
        "error": "gone",
    }


# -- LiveSource --------------------------------------------------------------------------------


def test_first_open_failure_is_not_retried() -> None:
    recorder = Recorder()
    recorder.source(f"rtsp://user:hunter2@{HOST}:{free_port()}/stream")
    with pytest.raises(SourceError, match="connection refused") as info:
        recorder.pump(lambda: False, 5.0, "error")
    assert "hunter2" not in str(info.value)
    assert recorder.events == []


class ReplyingRtspServer:
    """Answers every RTSP request with one error status, e.g. 503 Service Unavailable as a
    server does while it cannot prepare the stream; counts the connections."""

    def __init__(self, status: bytes) -> None:
        self.status = status
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.port}/stream"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                cseq = next(
                    (
                        line.split(b":", 1)[1].strip()
                        for line in request.split(b"\r\n")
                        if line.lower().startswith(b"cseq:")
                    ),
                    b"1",
                )
                conn.sendall(b"RTSP/1.0 " + self.status + b"\r\nCSeq: " + cseq + b"\r\n\r\n")

    def close(self) -> None:
        self.listener.close()


def test_first_open_of_a_busy_server_is_tried_a_few_times() -> None:
    """An error reply (the server is there but busy) is worth a retry even at the start;
    after FIRST_OPEN_ATTEMPTS the error names the problem."""
    busy = ReplyingRtspServer(b"503 Service Unavailable")
    try:
        recorder = Recorder()
        recorder.source(busy.url)
        with pytest.raises(SourceError, match="5XX error: busy or failing") as info:
            recorder.pump(lambda: False, 10.0, "error")
    finally:
        busy.close()
    assert info.value.busy
    assert busy.connections == FIRST_OPEN_ATTEMPTS
    assert recorder.events == []


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (b"401 Unauthorized", "401 Unauthorized: wrong or missing credentials"),
        (b"404 Not Found", "404 Not Found: the server has no stream at that path"),
    ],
)
def test_first_open_error_replies_name_the_problem(status: bytes, problem: str) -> None:
    server = ReplyingRtspServer(status)
    try:
        recorder = Recorder()
        recorder.source(f"rtsp://user:hunter2@{HOST}:{server.port}/stream")
        with pytest.raises(SourceError, match=problem) as info:
            recorder.pump(lambda: False, 10.0, "error")
    finally:
        server.close()
    assert not info.value.busy and server.connections == 1  # not worth a retry
    assert "hunter2" not in str(info.value)


def test_first_open_of_a_silent_server_is_not_retried() -> None:
    needs_rtsp()
    with StallServer() as stall:
        recorder = Recorder()
        recorder.source(stall.url)
        # Ended by the open timeout (the error says so), on the one connection: not retried.
        with pytest.raises(SourceStalled, match=f"open timeout of {OPEN_TIMEOUT_S:g} s"):
            recorder.pump(lambda: False, 10.0, "error")
        assert stall.accepted == 1
    assert recorder.events == []


def test_lost_then_reconnecting_then_connected(server: RtspServer) -> None:
    recorder = Recorder()
    source = recorder.source(server.url)
    try:
        recorder.pump(lambda: len(recorder.frames) >= 10, 10.0, "10 frames")
        assert [e for _, e in recorder.events] == [SourceEvent("connected", session=0)]

        server.stop()
        recorder.pump(lambda: recorder.of("lost"), 10.0, "'lost' event")
        lost = recorder.of("lost")[0][1]
        # Noticed as the end of the stream, not waited out as a stall (no time bound: the
        # error and the missing "stalled" event say which path it took).
        assert (lost.session, lost.attempt) == (0, 0)
        assert "ended" in (lost.error or "")
        assert recorder.of("stalled") == []

        recorder.pump(lambda: len(recorder.of("reconnecting")) >= 4, 10.0, "4 attempts")
        attempts = recorder.of("reconnecting")
        assert [e.attempt for _, e in attempts[:4]] == [1, 2, 3, 4]
        assert [e.next_try_in_s for _, e in attempts[:4]] == [0.2, 0.4, 0.5, 0.5]
        assert all(e.session == 0 for _, e in attempts)
        assert "ended" in (attempts[0][1].error or "")  # why the source went away
        assert "refused" in (attempts[1][1].error or "")  # why the last attempt failed
        for (before, previous), (after, _) in itertools.pairwise(attempts[:4]):
            assert after - before >= 0.9 * (previous.next_try_in_s or 0)  # waited it out
        downs = [e.down_s for _, e in attempts[:4]]
        assert downs == sorted(downs) and downs[0] >= 0
        frames_while_down = len(recorder.frames)

        server.start()
        recorder.pump(lambda: recorder.frames_of(1), 10.0, "a frame of session 1")
        connected = recorder.of("connected")
        assert len(connected) == 2
        back = connected[1][1]
        assert back.session == 1 and back.attempt >= 4 and back.down_s > 0
        assert source.session == 1  # reconnects so far
        assert len(recorder.frames) > frames_while_down
        sessions = [f.meta.session for f in recorder.frames]
        assert sessions == sorted(sessions)
    finally:
        source.close()


def test_reconnects_keep_numbering_and_time_and_leak_nothing(server: RtspServer) -> None:
    recorder = Recorder()
    source = recorder.source(server.url)
    try:
        recorder.pump(lambda: len(recorder.frames) >= 10, 10.0, "10 frames")
        fds = [open_fds()]
        for session in (1, 2, 3):
            server.stop()
            recorder.pump(
                lambda s=session: len(recorder.of("lost")) == s,
                10.0,
                f"'lost' event {session}",
            )
            server.start()
            recorder.pump(
                lambda s=session: len(recorder.frames_of(s)) >= 5,
                10.0,
                f"5 frames of session {session}",
            )
            fds.append(open_fds())
        assert source.session == 3  # reconnects so far
    finally:
        source.close()

    frames = recorder.frames
    # One frame sequence across all sessions.
    assert [f.meta.frame_index for f in frames] == list(range(len(frames)))
    assert [f.meta.session for f in frames] == sorted(f.meta.session for f in frames)
    assert {f.meta.session for f in frames} == {0, 1, 2, 3}
    # Timestamps: one time base, strictly increasing across the reconnects.
    assert {f.meta.time_base for f in frames} == {(1, 90000)}
    # Every frame has one (FFmpeg gives a session's first frame none: the clock places it),
    # starting at 0, strictly increasing.
    stamped = frames
    assert all(f.meta.pts is not None for f in frames) and frames[0].meta.pts == 0
    assert all(b.meta.pts > a.meta.pts for a, b in itertools.pairwise(stamped))
    # Across an outage the timestamps advance by about the time the source was gone.
    for session in (1, 2, 3):
        last = [f for f in stamped if f.meta.session == session - 1][-1]
        first = next(f for f in stamped if f.meta.session == session)
        jump_s = (first.meta.pts - last.meta.pts) / 90000
        wall_s = first.meta.capture_time - last.meta.capture_time
        assert jump_s > 0.1
        assert abs(jump_s - wall_s) < 0.5, (session, jump_s, wall_s)
    # The containers of closed connections are released: no descriptors pile up.
    assert max(fds) <= fds[0] + 3, fds


def test_frozen_stream_is_stalled_then_reconnected(server: RtspServer) -> None:
    with FreezeProxy((HOST, server.port)) as proxy:
        recorder = Recorder()
        source = recorder.source(proxy.url)
        try:
            recorder.pump(lambda: len(recorder.frames) >= 5, 10.0, "5 frames")
            frozen = time.monotonic()
            proxy.freeze()
            recorder.pump(lambda: recorder.of("stalled"), 10.0, "'stalled' event")
            stalled_at, stalled = recorder.of("stalled")[0]
            assert stalled_at - frozen >= 0.5 * READ_TIMEOUT_S  # it waited for the read timeout
            assert stalled.session == 0
            # Ended by the read timeout (no upper bound: the error names what ended it).
            assert f"read timeout of {READ_TIMEOUT_S:g} s" in (stalled.error or "")
            assert recorder.of("lost") == []
            proxy.thaw()
            recorder.pump(lambda: recorder.frames_of(1), 10.0, "a frame after the stall")
            assert recorder.of("reconnecting")[0][1].attempt == 1
            assert recorder.of("connected")[-1][1].session == 1
        finally:
            source.close()


def test_gives_up_after_the_source_stays_gone(server: RtspServer) -> None:
    give_up_s = 1.0
    recorder = Recorder()
    source = recorder.source(server.url, give_up_after_s=give_up_s)
    try:
        recorder.pump(lambda: len(recorder.frames) >= 5, 10.0, "5 frames")
        stopped = time.monotonic()
        server.stop()
        with pytest.raises(SourceError, match=r"has been gone for .*give_up_after_s 1\b") as info:
            recorder.pump(lambda: False, give_up_s + 5.0, "give-up error")
        elapsed = time.monotonic() - stopped
    finally:
        source.close()
    assert not isinstance(info.value, SourceStalled)
    assert elapsed >= 0.9 * give_up_s  # the whole give-up time, not less (the error names it)
    assert recorder.of("lost") and recorder.of("reconnecting")
    assert len(recorder.of("connected")) == 1  # only the first connection


def test_decoder_config_becomes_the_options_of_each_source_kind(clip: Path) -> None:
    webcam = spec_for(
        DecoderConfig(
            source="/dev/video0",
            video_size="1280x720",
            framerate=30,
            pixel_format="mjpeg",
            rtsp_transport="udp",
        )
    )
    assert webcam.format == "v4l2"
    assert webcam.options == {"video_size": "1280x720", "framerate": "30", "input_format": "mjpeg"}
    camera = spec_for(
        DecoderConfig(source="rtsp://cam.local/s", rtsp_transport="udp", video_size="1280x720")
    )
    assert camera.options == {"rtsp_transport": "udp"}
    assert spec_for(DecoderConfig(source=str(clip), video_size="1280x720")).options == {}


def test_reader_thread_hands_over_frames_and_events_and_stops_at_once(
    server: RtspServer,
) -> None:
    """The camera is read in a thread of its own: the iterating thread waits at most a tick
    for anything (so it can act on a signal), is told of the events, and closing never waits
    for a blocked read."""
    events: list[tuple[str, SourceEvent]] = []  # with the thread that was told of each
    source = LiveSource(
        parse_source(server.url),
        open_timeout_s=OPEN_TIMEOUT_S,
        read_timeout_s=READ_TIMEOUT_S,
        backoff=BACKOFF,
        on_event=lambda event: events.append((threading.current_thread().name, event)),
    )
    items = iter(source)
    frames: list[DecodedFrame] = []
    ticks = 0  # None items: a step without a frame

    def read_until(done: Callable[[], bool], timeout_s: float) -> None:
        nonlocal ticks
        deadline = time.monotonic() + timeout_s  # a hang guard
        while not done():
            states = [e.state for _, e in events]
            assert time.monotonic() < deadline, f"timed out; {len(frames)} frames, {states}"
            item = next(items)
            if item is None:
                ticks += 1
            else:
                frames.append(item)

    read_until(lambda: len(frames) >= 5, 10.0)
    assert all(isinstance(frame, DecodedFrame) for frame in frames)
    server.stop()
    read_until(lambda: any(e.state == "reconnecting" for _, e in events), 10.0)
    assert [e.state for _, e in events[:3]] == ["connected", "lost", "reconnecting"]
    assert {thread for thread, _ in events} == {threading.current_thread().name}
    # No data comes while the server is gone, yet the iteration is never stuck in a read:
    # it comes back with a tick at a time.
    outage = ticks
    read_until(lambda: ticks >= outage + 5, 10.0)
    source.close()
    assert list(items) == []  # closed: the iteration ends
    deadline = time.monotonic() + 10.0  # a hang guard: it ends once its read returns
    while source.reading:  # the thread ends by closing the source
        assert time.monotonic() < deadline, "the reader thread did not stop"
        time.sleep(0.01)
    assert not source.source.is_open
