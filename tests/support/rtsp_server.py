"""A local RTSP server for tests, run by the *system* python (it needs GStreamer's gi bindings,
which the project's virtual environment does not have); `tests/support/rtsp.py` starts and stops it.

    /usr/bin/python3 tests/support/rtsp_server.py --port 8554 --media clip.mp4
    /usr/bin/python3 tests/support/rtsp_server.py --port 0 --testsrc 160x120@25

``--media`` serves an H.264 mp4 as it is (no re-encoding: the image has no H.264 encoder), in
real time at the file's own rate, and ends the stream at the file's end: a test that streams
for a minute serves a clip of a minute. (Looping with segment seeks was tried and dropped: under
CPU load GStreamer 1.22's RTSP server aborted in gst_rtsp_media_get_rates, 3 times in 30
starts, where the plain file never did.) ``--testsrc WxH@FPS`` serves a live
videotestsrc as RTP/JPEG and needs no file. Each client gets a pipeline of its own (the
factory is not shared), so every client starts at the clip's first frame, a keyframe, instead
of joining mid-GOP and waiting for the next one.

The server listens on 127.0.0.1 only. Once it does, it prints exactly one line,
``READY rtsp://127.0.0.1:PORT/stream`` (``--port 0`` picks a free port, reported there).
SIGTERM or SIGINT closes every client and exits promptly with status 0.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

HOST = "127.0.0.1"


def testsrc_launch(spec: str) -> str:
    """The launch line for ``--testsrc WxH@FPS``. RTP/JPEG carries sizes in units of 8 pixels,
    hence the check (anything else would be served as a silently different size), and only
    4:2:0 or 4:2:2 JPEG, hence I420 (rtpjpegpay drops jpegenc's default 4:4:4 frames)."""
    match = re.fullmatch(r"(\d+)x(\d+)@(\d+)", spec)
    if match is None:
        raise SystemExit(f"--testsrc wants WxH@FPS, e.g. 160x120@25, not {spec!r}")
    width, height, fps = (int(v) for v in match.groups())
    if width % 8 or height % 8 or not 0 < width <= 2040 or not 0 < height <= 2040:
        raise SystemExit(f"--testsrc size {width}x{height}: RTP/JPEG needs multiples of 8")
    return (
        "( videotestsrc is-live=true"
        f" ! video/x-raw,format=I420,width={width},height={height},framerate={fps}/1"
        " ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
    )


def media_launch(path: str) -> str:
    """The launch line for ``--media``: demux and payload the file's H.264 as it is.
    ``config-interval=1`` repeats SPS/PPS with every keyframe, as cameras do."""
    location = path.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'( filesrc location="{location}" ! qtdemux name=demux'
        " ! h264parse name=parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--path", default="/stream", help="mount point (default /stream)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--media", help="H.264 mp4 file to serve")
    source.add_argument("--testsrc", metavar="WxH@FPS", help="serve a live test pattern")
    args = parser.parse_args(argv)

    Gst.init(None)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(testsrc_launch(args.testsrc) if args.testsrc else media_launch(args.media))

    server = GstRtspServer.RTSPServer()
    server.set_address(HOST)
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.path, factory)
    # attach() creates the socket, binds it with SO_REUSEADDR (so a restarted server gets its
    # port back at once, while connections of the old one still linger in FIN_WAIT2 or
    # TIME_WAIT) and listens; it returns 0 when it cannot.
    if server.attach(None) == 0:
        print(f"cannot listen on {HOST}:{args.port}", file=sys.stderr)
        return 1

    loop = GLib.MainLoop()

    def stop() -> bool:
        # Closing the clients first sets their pipelines to NULL, so nothing streams while
        # the interpreter shuts down.
        server.client_filter(lambda _server, _client: GstRtspServer.RTSPFilterResult.REMOVE)
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, stop)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, stop)
    print(f"READY rtsp://{HOST}:{server.get_bound_port()}{args.path}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
