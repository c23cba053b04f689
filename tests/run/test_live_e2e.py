"""Live mode through `samstream run`: a real RTSP server, real processes, real sockets.

Each test starts the whole graph as subprocesses on a camera served by GStreamer's RTSP
server (tests/support/rtsp.py), subscribes to the mask feed, and watches masks and the statuses the
launcher relays from every node. Image size 256 keeps a 2-core CPU near the source rate.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import pytest
from support.e2e import alive, child_pids, free_port
from support.media import make_clip
from support.rtsp import GSTREAMER_RTSP_MISSING, FreezeProxy, RtspServer, gstreamer_rtsp_available

from pipeline.wire.client import MaskFrame, MaskSubscriber
from pipeline.wire.messages import StatusMessage

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 2.0
LIVE_FAST = [
    "--image-size",
    "256",
    "--set",
    f"decoder.read_timeout_s={READ_TIMEOUT_S}",
    "--set",
    "decoder.open_timeout_s=3",
    "--set",
    "decoder.reconnect_initial_s=0.2",
    "--set",
    "decoder.reconnect_max_s=1.0",
    "--set",
    "publisher.status_interval_s=0.5",
]
STARTUP_S = 120  # four processes importing torch on a busy 2-core machine
# The camera serves its clip once: 4 minutes at 10 fps outlasts every test, startup included,
# so the clip's end never passes for a dropped connection.
CAMERA_FRAMES = 2400


def needs_rtsp() -> None:
    if not gstreamer_rtsp_available():
        pytest.skip(GSTREAMER_RTSP_MISSING)


class LiveRun:
    """`samstream run` in a subprocess plus a subscriber thread that records every mask
    frame and every node status with the time it arrived (time.monotonic)."""

    def __init__(
        self,
        source: str,
        checkpoint: Path,
        *args: str,
        env: dict[str, str] | None = None,
        server: RtspServer | None = None,
    ) -> None:
        self.server = server  # named in failure messages: is the camera still up?
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--source",
            source,
            "--box",
            "20",
            "20",
            "80",
            "80",
            "--weights",
            str(checkpoint),
            *LIVE_FAST,
            *args,
            "--set",
            f"transport.publish={self.endpoint}",
        ]
        self.env = {**os.environ, **(env or {})}
        self.frames: list[tuple[float, MaskFrame]] = []
        self.statuses: list[tuple[float, StatusMessage]] = []
        self.lock = threading.Lock()
        self._done = threading.Event()
        self.sub = MaskSubscriber(self.endpoint)
        self.proc: subprocess.Popen | None = None
        self.stdout = self.stderr = ""

    def __enter__(self) -> LiveRun:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()
        return self

    def _collect(self) -> None:
        while not self._done.is_set():
            event = self.sub.recv_event(100)
            now = time.monotonic()
            with self.lock:
                if isinstance(event, MaskFrame):
                    self.frames.append((now, event))
                elif isinstance(event, StatusMessage):
                    self.statuses.append((now, event))

    def wait_until(
        self, what: str, condition: Callable[[], bool], timeout_s: float, start: float | None = None
    ) -> float:
        """Seconds from ``start`` (default: now) until ``condition`` held; fails the test
        when it does not hold ``timeout_s`` after ``start``."""
        start = time.monotonic() if start is None else start
        while time.monotonic() - start < timeout_s:
            with self.lock:
                if condition():
                    return time.monotonic() - start
            if self.proc is not None and self.proc.poll() is not None:
                self.finish()
                camera = ""
                if self.server is not None and self.server.process is not None:
                    code = self.server.process.poll()
                    camera = f"\nRTSP server: {'running' if code is None else f'exited {code}'}"
                pytest.fail(
                    f"the run ended while waiting for {what}:\n{self.stderr[-3000:]}" + camera
                )
            time.sleep(0.02)
        pytest.fail(f"no {what} within {timeout_s} s")

    def masks_after(self, since: float) -> int:
        return sum(1 for t, _ in self.frames if t >= since)

    def decoder_state_after(self, since: float, states: set[str]) -> bool:
        return any(
            t >= since and s.node == "decoder" and s.state in states for t, s in self.statuses
        )

    def decoder_event_after(self, since: float, states: set[str], session: int) -> bool:
        """A decoder status in ``states`` about connection ``session``, received after
        ``since``."""
        return any(
            t >= since
            and s.node == "decoder"
            and s.state in states
            and s.detail.get("source_state", {}).get("session") == session
            for t, s in self.statuses
        )

    def node_pid(self, name: str) -> int:
        """The running ``name`` node's pid (not its spare's: ``--standby``)."""
        return self.node_pids()[name]

    def node_pids(self) -> dict[str, int]:
        """The pids of the nodes started with --run-file (not the spares), by name."""
        pids = {}
        for pid in child_pids(self.proc.pid):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--run-file" in args:
                pids[args[args.index(b"node") + 1].decode()] = pid
        return pids

    def finish(self) -> None:
        """SIGTERM the launcher (the usual end of a live run) and keep its output."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
        self._done.set()
        self._thread.join(timeout=5)
        self.sub.close()

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def summary_counts(self) -> tuple[int, int, dict[str, int]]:
        """(frames in, frames out, frames not published by cause) from the printed summary:
        dropped before each node, and in flight when the run was stopped."""
        counts = re.search(r"frames in (\d+), out (\d+)", self.stdout)
        drops = re.search(
            r"dropped \(newest frame wins\): (.*?); in flight at stop: (\d+)", self.stdout
        )
        assert counts and drops, f"no summary in:\n{self.stdout}\n{self.stderr[-2000:]}"
        lost = {m[0]: int(m[1]) for m in re.findall(r"before (\w+) (\d+)", drops[1])}
        lost["in flight"] = int(drops[2])
        return int(counts[1]), int(counts[2]), lost


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_rtsp_masks_flow_and_survive_three_server_restarts(
    checkpoint: Path, tmp_path: Path
) -> None:
    needs_rtsp()
    clip = make_clip(tmp_path / "clip.mp4", frames=CAMERA_FRAMES, size=(160, 120), fps=10)
    out = tmp_path / "out"
    with (
        RtspServer(clip) as server,
        LiveRun(server.url, checkpoint, "--out", str(out), server=server) as run,
    ):
        run.wait_until("first masks", lambda: len(run.frames) >= 5, STARTUP_S)
        nodes = run.node_pids()
        decoder = nodes["decoder"]
        # Each node process runs with its torch thread budget (a quarter of the cores for
        # the tracker, leaving the rest to the encoder).
        tracker_env = Path(f"/proc/{run.node_pid('tracker')}/environ").read_bytes().split(b"\0")
        cores = len(os.sched_getaffinity(0))
        assert f"OMP_NUM_THREADS={max(1, cores // 4)}".encode() in tracker_env
        fds_before = fd_count(decoder)
        for session in range(3):
            # Stop the camera while connection `session` streams; it must be reported lost,
            # and masks must come from the next connection soon after the camera is back.
            stopped = time.monotonic()
            server.stop()
            lost_s = run.wait_until(
                f"'source lost' status (connection {session})",
                lambda since=stopped, n=session: run.decoder_event_after(
                    since, {"lost", "reconnecting"}, n
                ),
                READ_TIMEOUT_S + 1,
                start=stopped,
            )
            restarted = time.monotonic()
            server.start()
            back_s = run.wait_until(
                f"masks from connection {session + 1}",
                lambda n=session + 1: any(f.session == n for _, f in run.frames),
                5.0,
                start=restarted,
            )
            print(
                f"connection {session}: lost reported {lost_s:.2f} s after the stop, "
                f"masks again {back_s:.2f} s after the restart"
            )
        # The same node processes (none restarted), and the decoder closed every connection
        # it opened.
        assert run.node_pids() == nodes
        assert fd_count(decoder) <= fds_before + 2
        children = child_pids(run.proc.pid)  # the nodes and the spares
        run.finish()
    assert not [pid for pid in children if alive(pid)], "node processes outlived the run"

    frames = [frame for _, frame in run.frames]
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "sequence numbers must only increase"
    assert {f.session for f in frames} == {0, 1, 2, 3}  # one session per connection
    assert [f.frame_index for f in frames] == sorted(f.frame_index for f in frames)
    # Every frame the decoder received is published, or counted as dropped or in flight.
    frames_in, frames_out, lost = run.summary_counts()
    assert frames_in == frames_out + sum(lost.values())
    assert frames_out >= len(frames)
    assert "source reconnects: 3" in run.stdout
    # A live run ends with a signal; its outputs are finished, one entry per published frame.
    lines = (out / "masks.jsonl").read_text().splitlines()
    assert len(lines) == frames_out == len(list((out / "masks").glob("*.png")))
    written = [json.loads(line)["seq"] for line in lines]
    assert written == sorted(set(written))
    assert {f.seq for f in frames} <= set(written)  # what the subscriber got is on disk too
    with av.open(str(out / "overlay.mp4")) as overlay:
        times = [float(f.pts * f.time_base) for f in overlay.decode(video=0)]
    assert len(times) == frames_out and times == sorted(times)


def test_rtsp_stall_is_reported_and_the_stream_resumes(checkpoint: Path, tmp_path: Path) -> None:
    needs_rtsp()
    clip = make_clip(tmp_path / "clip.mp4", frames=CAMERA_FRAMES, size=(160, 120), fps=10)
    with RtspServer(clip) as server, FreezeProxy(("127.0.0.1", server.port)) as proxy:
        with LiveRun(proxy.url, checkpoint) as run:
            run.wait_until("first masks", lambda: len(run.frames) >= 3, STARTUP_S)
            frozen = time.monotonic()
            proxy.freeze()
            stalled_s = run.wait_until(
                "'stalled' status",
                lambda: run.decoder_state_after(frozen, {"stalled"}),
                READ_TIMEOUT_S + 1,
                start=frozen,
            )
            thawed = time.monotonic()
            proxy.thaw()
            run.wait_until("masks after the stall", lambda: run.masks_after(thawed) >= 1, 10.0)
            # Stopped while the camera hangs (the decoder inside a blocking read): the
            # decoder still goes at once, and nothing outlives the run.
            children = child_pids(run.proc.pid)
            decoder = run.node_pid("decoder")
            proxy.freeze()
            run.finish()
    # Every node, the decoder in its read included, stopped by itself within the grace
    # period: the supervisor names in the summary any it had to kill.
    assert "stopped by SIGTERM" in run.stdout
    assert "killed, not stopped within the grace period" not in run.stdout, run.stdout
    assert not alive(decoder)
    assert not [pid for pid in children if alive(pid)], "node processes outlived the run"
    print(f"stall reported {stalled_s:.2f} s after the freeze")
    detail = next(
        s.detail
        for t, s in run.statuses
        if t >= frozen and s.node == "decoder" and s.state == "stalled"
    )
    assert "stalled" in detail["source_state"]["error"]


SLOW_ENCODER = Path(__file__).parents[1] / "support" / "slow_encoder"


def test_slow_encoder_keeps_latency_bounded(checkpoint: Path, tmp_path: Path) -> None:
    """An encoder at under half the camera's rate for 20 s: latency does not grow, the
    frames it cannot take are dropped and counted, nothing queues up."""
    needs_rtsp()
    clip = make_clip(tmp_path / "clip.mp4", frames=CAMERA_FRAMES, size=(160, 120), fps=10)
    # 10 fps source, encoder < 5 fps: 200 ms more per batch (tests/support/slow_encoder).
    slow = {
        "SAMSTREAM_SLOW_ENCODER_MS": "200",
        "PYTHONPATH": os.pathsep.join(
            [
                str(Path(__file__).parents[1] / "support" / "slow_encoder"),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    }
    with (
        RtspServer(clip) as server,
        LiveRun(server.url, checkpoint, env=slow, server=server) as run,
    ):
        run.wait_until("first masks", lambda: len(run.frames) >= 3, STARTUP_S)
        start = time.monotonic()
        run.wait_until("20 s of masks", lambda: time.monotonic() - start >= 20, 30)
        run.finish()
    window = [(t - start, f) for t, f in run.frames if t >= start]
    latencies = [f.timings["latency"] for _, f in window]
    assert 20 <= len(window) <= 20 * 6, f"{len(window)} frames in 20 s from a slowed encoder"
    # Queueing is time a frame spends waiting, not being worked on: latency minus its stage
    # times, in encoder periods (frames queued ahead of it). On a machine whose load changes
    # during the run the stage times change too; the wait in frames does not, unless a
    # queue builds. Newest-frame-wins keeps it near one period (the frame being encoded).
    stages = ("decode", "encoder", "tracker", "publish")
    queued = [
        (f.timings["latency"] - sum(f.timings.get(k, 0.0) for k in stages)) / f.timings["encoder"]
        for _, f in window
    ]
    quarter = len(window) // 4
    first = statistics.median(queued[:quarter])
    last = statistics.median(queued[-quarter:])
    encoder_ms = statistics.median(f.timings["encoder"] for _, f in window)
    print(
        f"latency ms: median {statistics.median(latencies):.0f}, max {max(latencies):.0f}; "
        f"frames waiting ahead: first quarter median {first:.2f}, last quarter {last:.2f}; "
        f"encoder median {encoder_ms:.0f} ms; frames {len(window)}"
    )
    assert last <= first + 1.0, "the wait grows: frames are queueing"
    assert last <= 3.0, "more than three frames ahead of the newest: a queue"
    assert max(latencies) < 10 * encoder_ms, "latency far beyond a few encoder periods"
    assert all(f.timings["encoder"] >= 200 for _, f in window)
    frames_in, frames_out, lost = run.summary_counts()
    assert lost["encoder"] >= frames_out, "half the frames or more must be dropped"
    assert frames_in == frames_out + sum(lost.values())


def test_file_played_in_real_time_runs_live_to_the_end(checkpoint: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=30, size=(160, 120), fps=15)
    run = LiveRun(str(clip), checkpoint, "--realtime")
    with run:
        run.proc.wait(timeout=STARTUP_S)
    assert run.proc.returncode == 0, run.stderr[-3000:]
    frames_in, frames_out, lost = run.summary_counts()
    assert frames_in == 30 and frames_in == frames_out + sum(lost.values())
    assert lost["in flight"] == 0  # the stream ended: nothing was cut off
    assert "(live)" in run.stdout
    assert "capture-to-publish latency median" in run.stdout


@pytest.mark.parametrize("source", ["/dev/video9", "9"])
def test_missing_webcam_fails_fast_and_names_it(source: str) -> None:
    """Fast: found by the checks before any node starts, before torch is even imported."""
    script = (
        "import sys; from pipeline.cli import main; code = main(['run', '--source', sys.argv[1]]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); "
        "sys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, source], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "/dev/video9" in proc.stderr and "does not exist" in proc.stderr
    assert proc.stdout.strip() == "torch not imported", proc.stdout
    assert "run, encoder on" not in proc.stderr  # no node was started


@pytest.mark.parametrize("case", ["refused", "not found"])
def test_a_camera_that_never_opens_ends_the_run_with_one_error(
    case: str, checkpoint: Path, tmp_path: Path
) -> None:
    """A wrong RTSP URL (nothing listens there, or the server has no such stream) is a
    configuration error: the checks before any node starts open the camera, and the run
    ends with that one error, the URL in it (it was a decoder restarted 10 times)."""
    server = None
    if case == "not found":
        needs_rtsp()
        clip = make_clip(tmp_path / "cam.mp4", frames=50, size=(160, 120))
        server = RtspServer(clip).start()
        url = f"rtsp://127.0.0.1:{server.port}/no-such-stream"
    else:
        url = f"rtsp://127.0.0.1:{free_port()}/stream"
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "run",
                "--source",
                url,
                "--weights",
                str(checkpoint),
                *LIVE_FAST,
            ],
            capture_output=True,
            text=True,
            timeout=STARTUP_S + 60,
        )
        print(f"{case}: error after {time.monotonic() - start:.1f} s; stderr:\n{proc.stderr}")
    finally:
        if server is not None:
            server.close()
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("samstream: error:")]
    assert len(errors) == 1 and url in errors[0], proc.stderr
    assert "run, encoder on" not in proc.stderr  # no node was started
    assert "Traceback" not in proc.stderr
