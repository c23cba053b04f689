"""Real RTSP endpoints for tests: a GStreamer RTSP server, a silent camera, a freezable proxy.

`RtspServer` runs ``tests/support/rtsp_server.py`` under the system python (GStreamer's gi
bindings are not in the project's virtual environment) and can be stopped and restarted on the
same port, like a camera that reboots. `StallServer` accepts connections and never answers, like a
camera that hangs before RTSP. `FreezeProxy` sits in front of a server and stops forwarding on
`freeze()`, like a camera (or network) that stalls mid-stream with the TCP connection open.

What PyAV 18.1 / FFmpeg 8.0 does in each case, measured here with ``rtsp_transport=tcp``
(tests/video/test_rtsp_infra.py asserts all of it; the decoder's reconnect logic depends on it):

- Server stopped (SIGTERM) mid-stream: ``container.demux()`` does not raise and does not wait
  for the read timeout: it yields what was buffered, then one empty flush packet
  (``size == 0``, ``pts is None``), then ends (StopIteration), within a few ms of the server
  exit. ``container.decode()`` likewise just ends. On a live source a plain end of the stream
  therefore means a lost connection.
- Silent server at open (`StallServer`), ``timeout=(1.0, 1.0)``: ``av.open`` raises
  ``av.error.InvalidDataError`` (errno AVERROR_INVALIDDATA, "Invalid data found when
  processing input: '<url>'") after 1.0 s. It is the open timeout that fires (FFmpeg logs
  "Failed reading RTSP data: Immediate exit requested"), but the RTSP demuxer reports it as
  invalid data: only the elapsed time tells a timeout from a broken server.
- Stall mid-stream (`FreezeProxy.freeze`), read timeout T: ``demux()`` yields the few packets
  already received at once, then raises ``av.error.ExitError`` (errno AVERROR_EXIT,
  "Immediate exit requested: '<url>'") only after *2 T* of silence (2.0 s for T = 1 s). The
  read timeout bounds each read call; the first one that runs out makes FFmpeg flush its
  H.264 parser, which hands out the last frame's packet as a successful read, and only the
  second one raises. The demux generator is finished after that: reopen to go on.
- The first frame decoded from the RTSP H.264 stream has ``pts is None`` (FFmpeg has not
  mapped the RTP clock yet); the following ones have pts in 1/90000 s.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

__all__ = [
    "GSTREAMER_RTSP_MISSING",
    "HOST",
    "FreezeProxy",
    "RtspServer",
    "StallServer",
    "free_port",
    "gstreamer_rtsp_available",
]

HOST = "127.0.0.1"
SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
STOP_GRACE_S = 2.0
GSTREAMER_RTSP_MISSING = (
    f"GStreamer RTSP server not usable from {SYSTEM_PYTHON} (apt: python3-gi "
    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good)"
)
_L = TypeVar("_L", bound="_Listener")

# Everything rtsp_server.py builds its pipelines from: the bindings alone are not enough.
_PROBE = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
for name in ("filesrc", "qtdemux", "h264parse", "rtph264pay", "videotestsrc", "jpegenc",
             "rtpjpegpay"):
    assert Gst.ElementFactory.find(name), name
"""


@functools.cache
def gstreamer_rtsp_available() -> bool:
    """Whether `RtspServer` can run here, so tests can skip with a reason instead of failing.

    Checked once per session in a subprocess, which also builds GStreamer's plugin registry
    cache, the slow part of a first start, before any test's start timeout runs.
    """
    if not Path(SYSTEM_PYTHON).exists():
        return False
    try:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (nothing listens there now)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class RtspServer:
    """``rtsp://127.0.0.1:PORT/stream`` served by a GStreamer subprocess.

    Give ``media`` (an H.264 mp4, e.g. from `media.make_clip`, served once: its length is how
    long the camera streams) or ``testsrc`` (``"WxH@FPS"``, a live RTP/JPEG test pattern; sizes are
    multiples of 8). ``port=None`` lets the server pick a free port on the first start;
    `restart` always comes back on the port the server had, as a rebooted camera does.
    """

    def __init__(
        self,
        media: Path | None = None,
        port: int | None = None,
        testsrc: str | None = None,
        *,
        path: str = "/stream",
    ) -> None:
        if (media is None) == (testsrc is None):
            raise ValueError("give exactly one of media and testsrc")
        self.media = media
        self.port = port
        self.testsrc = testsrc
        self.path = path
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr = ""  # what the last stopped server wrote there, for assertion messages
        self._stderr: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port yet: start() it first")
        return f"rtsp://{HOST}:{self.port}{self.path}"

    def _command(self) -> list[str]:
        command = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port or 0)]
        command += ["--path", self.path]
        if self.testsrc is not None:
            return [*command, "--testsrc", self.testsrc]
        return [*command, "--media", str(self.media)]

    def start(self, timeout_s: float = 10.0) -> RtspServer:
        """Start the server and return once it listens (its READY line), within ``timeout_s``.

        Raises RuntimeError with the server's stderr when it exits or stays silent instead.
        """
        if self.process is not None:
            raise RuntimeError(f"already running (pid {self.process.pid})")
        # stderr goes to a file, not a pipe: nobody reads it while the server runs, and a
        # full pipe would block GStreamer's warnings and with them the streaming threads.
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        try:
            line = self._read_ready_line(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.port = urllib.parse.urlsplit(line.removeprefix("READY ")).port
        return self

    def _read_ready_line(self, timeout_s: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        received = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in received:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"RTSP server not ready within {timeout_s:g} s: {self._stderr_text()}"
                    )
                if not selector.select(left):
                    continue
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:  # stdout closed: the server exited
                    self.process.wait(STOP_GRACE_S)
                    raise RuntimeError(
                        f"RTSP server exited with status {self.process.returncode} before it "
                        f"was ready: {self._stderr_text()}"
                    )
                received += chunk
        line = received.decode().strip()
        if not line.startswith("READY rtsp://"):
            raise RuntimeError(f"RTSP server said {line!r}: {self._stderr_text()}")
        return line

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip() or "(no stderr)"

    def stop(self) -> int | None:
        """Stop the server (SIGTERM; SIGKILL after 2 s) and reap it; its exit status, or None
        when it was not running. Clients see the connection close, as when a camera goes off."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert process.stdout is not None
        process.stdout.close()
        self.stderr = self._stderr_text()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return process.returncode

    def restart(self, timeout_s: float = 10.0) -> RtspServer:
        """Stop, then start again on the same port (which the server binds with SO_REUSEADDR,
        so connections of the old server still lingering in FIN_WAIT2 or TIME_WAIT do not
        block it)."""
        self.stop()
        return self.start(timeout_s)

    def close(self) -> None:
        """Stop the server if it runs: no child process is left behind."""
        self.stop()

    def __enter__(self) -> RtspServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Listener:
    """A TCP listening socket on 127.0.0.1 whose connections a daemon thread accepts.

    Every socket and thread it makes is tracked, so `close` can wake and end them all:
    ``shutdown()`` is what interrupts a thread blocked in accept/recv/send (a bare ``close()``
    from another thread does not, on Linux).
    """

    def __init__(self, port: int = 0) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections accepted so far: did the client really come?
        self._listener = socket.create_server((HOST, port))
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.port}/stream"

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    def _track(self, sock: socket.socket) -> bool:
        """Remember ``sock`` for `close`; False (and ``sock`` closed) if already closing."""
        with self._lock:
            if not self._closed:
                self._sockets.append(sock)
                return True
        sock.close()
        return False

    def _forget(self, *socks: socket.socket) -> None:
        """Close sockets whose connection is over, so a long test does not pile up fds."""
        with self._lock:
            self._sockets = [s for s in self._sockets if s not in socks]
        for sock in socks:
            sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # shut down by close()
                return
            self.accepted += 1
            if self._track(conn):
                self._on_accept(conn)

    def _on_accept(self, conn: socket.socket) -> None:
        """Handle a new connection (already tracked); runs on the accept thread."""

    def close(self) -> None:
        """Close the listener and every connection, and wait for the threads to end."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = [self._listener, *self._sockets], []
            threads = list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # never connected, or the peer is gone already
                pass
        for thread in threads:
            thread.join(STOP_GRACE_S)
        for sock in sockets:
            sock.close()

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class StallServer(_Listener):
    """A camera that accepts the TCP connection and then never sends a byte."""


class FreezeProxy(_Listener):
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (host, port), for stalls mid-stream.

    Each connection is forwarded by two threads, one per direction. `freeze` stops all
    forwarding, in both directions and for new connections too, with every connection left
    open: the client sees silence, neither data nor a close (an upstream close while frozen
    is held back as well). `thaw` resumes forwarding on all connections, including what was
    received while frozen, as after a network hiccup; the upstream may have given up on a
    connection in the meantime, and then the client sees that close.
    """

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self._flowing = threading.Event()
        self._flowing.set()
        super().__init__(port)

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def freeze(self) -> None:
        """Stop forwarding anything, keeping all connections open."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, on old and new connections alike."""
        self._flowing.set()

    def _on_accept(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=STOP_GRACE_S)
        except OSError:  # upstream down: the client sees a closed connection, as it would
            self._forget(conn)
            return
        upstream.settimeout(None)
        if self._track(upstream):
            self._spawn(self._connection, conn, upstream)

    def _connection(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward one connection, client to upstream here and back on a second thread, and
        close both sockets once both directions have ended."""
        back = self._spawn(self._forward, upstream, client)
        self._forward(client, upstream)
        back.join()
        self._forget(client, upstream)

    def _forward(self, source: socket.socket, dest: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            self._flowing.wait()
            if self._closed:
                return
            try:
                if not data:
                    dest.shutdown(socket.SHUT_WR)  # pass the end of the stream on
                    return
                dest.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._flowing.set()
        super().close()
