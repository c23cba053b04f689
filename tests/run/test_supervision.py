"""A node that dies is restarted: a live run carries on, an offline run resumes exactly."""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.e2e import FAST, alive, child_pids, free_port, samstream
from support.media import make_clip

from pipeline.run.supervisor import MAX_RESTARTS
from pipeline.wire.client import MaskFrame, MaskSubscriber

pytestmark = pytest.mark.slow


def _node_pid(
    launcher: int,
    name: str,
    *,
    not_pid: int | None = None,
    wait_s: float = 60,
    role: str = "--run-file",
) -> int:
    """The pid of the launcher's ``name`` node (other than ``not_pid``, one killed before),
    waiting for it: after a death the launcher is restarting the nodes for a while.
    ``role``: "--run-file" the running node, "--standby" its spare."""
    deadline = time.monotonic() + wait_s
    while True:
        for pid in child_pids(launcher):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if f"node {name} {role}".encode() in cmdline and pid != not_pid:
                return pid
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} {role} process under {launcher} within {wait_s} s")
        time.sleep(0.05)


def _ready_spare(launcher: int, name: str, running: int, wait_s: float = 120) -> int:
    """The pid of the launcher's spare ``name`` process once it has done its imports: it
    then has closed its end of the launcher's ready pipe (and waits for its config path).
    ``running``: the node's running process (a spare that took over keeps its --standby
    command line)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for pid in child_pids(launcher):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue  # it went away
            if pid == running or f"node {name} --standby".encode() not in cmdline:
                continue
            args = cmdline.split()
            ready_fd = int(args[args.index(b"--standby") + 1])
            if not Path(f"/proc/{pid}/fd/{ready_fd}").exists():
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no ready spare {name} under {launcher} within {wait_s} s")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_live(checkpoint: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    """A live run of a 10 fps test source, one object, masks on ``endpoint``."""
    return _start(
        [
            "run",
            "--source",
            "lavfi:testsrc2=size=160x120:rate=10",
            "--realtime",
            *("--box", "10", "10", "80", "80"),
            *("--weights", str(checkpoint)),
            *FAST,
            *("--set", f"transport.publish={json.dumps(endpoint)}"),
            *extra,
        ]
    )


def _offline_args(clip: Path, checkpoint: Path) -> list[str]:
    """`samstream run` arguments for ``clip``, one object (add --out DIR)."""
    return [
        *("--source", str(clip)),
        *("--box", "10", "40", "50", "80"),
        *("--weights", str(checkpoint)),
        *FAST,
    ]


def _kill_and_follow(
    launcher: int, name: str, sub: MaskSubscriber, pid: int | None = None
) -> list[tuple[float, Any]]:
    """SIGKILL the launcher's ``name`` node (process ``pid``; None: the one started with
    --run-file); every event of the feed (with the time.monotonic() it came), up to the
    masks of a frame captured after the kill."""
    os.kill(pid or _node_pid(launcher, name), signal.SIGKILL)
    killed, killed_wall = time.monotonic(), time.time()
    events = []
    while True:
        event = sub.recv_event(60_000)
        assert event is not None, f"no masks within 60 s of the {name} kill"
        events.append((time.monotonic(), event))
        if isinstance(event, MaskFrame) and event.capture_time > killed_wall:
            return events
        assert time.monotonic() - killed < 120, f"no masks of a new frame after the {name} kill"


def _states(events: list[tuple[float, Any]], state: str) -> list[tuple[float, str]]:
    return [(t, e.node) for t, e in events if getattr(e, "state", None) == state]


def test_live_run_survives_encoder_kills(checkpoint: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    kills = MAX_RESTARTS  # 10: the most a minute allows; one more would fail the run
    proc = _start_live(checkpoint, endpoint)
    resumed_after: list[float] = []
    after_load: list[float] = []  # from the new encoder's model loaded to the masks
    seqs: list[int] = []
    degraded: list[str] = []
    try:
        with MaskSubscriber(endpoint, timeout_ms=120_000) as sub:
            first = sub.recv(120_000)
            assert first is not None
            seqs.append(first.seq)
            encoder = _node_pid(proc.pid, "encoder")
            for _ in range(kills):
                # What a rare death meets: a spare whose imports are done (killing before
                # would measure a spare still importing). The spare takes over.
                spare = _ready_spare(proc.pid, "encoder", running=encoder)
                killed, killed_wall = time.monotonic(), time.time()
                events = _kill_and_follow(proc.pid, "encoder", sub, pid=encoder)
                encoder = spare
                seqs += [e.seq for _, e in events if isinstance(e, MaskFrame)]
                degraded += [node for _, node in _states(events, "degraded")]
                done = events[-1][0]
                resumed_after.append(done - killed)
                # Its first status after setup(): the model is loaded. (Not one its
                # predecessor sent just before the kill.)
                loaded = [
                    t
                    for t, e in events
                    if getattr(e, "state", None) == "running"
                    and e.node == "encoder"
                    and e.time > killed_wall
                ]
                if loaded:
                    after_load.append(done - loaded[0])
            assert proc.poll() is None, "the run ended"
        children = child_pids(proc.pid)  # the four nodes and the spares
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(
        "masks again after each encoder kill (s):",
        [round(t, 2) for t in resumed_after],
        f"median {statistics.median(resumed_after):.2f}; after the model load:",
        [round(t, 2) for t in after_load],
    )
    assert len(resumed_after) == kills
    assert all(b > a for a, b in itertools.pairwise(seqs)), "seq went backwards"
    assert degraded.count("encoder") >= 1, "consumers were not told"
    assert "nodes restarted after dying" in stdout, stdout
    assert len(children) >= 5, "no spare process"
    assert not [pid for pid in children if alive(pid)], "a node or a spare outlived the run"
    assert stderr.count("node encoder: a spare took over (its imports were done)") == kills


def test_live_run_survives_decoder_publisher_and_tracker_kills(checkpoint: Path) -> None:
    """A new decoder continues the stream (sequence numbers, frame indices and timestamps
    go on, never back); a new publisher binds the same feed, and the subscriber that was
    there gets masks again without doing anything; a new tracker goes on with the tracks
    (the one object keeps its id and is still followed)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Every measurement trusted: the random-weight masks keep the one track alive, so what
    # a tracker restart does to it shows.
    trust = ("tracker.min_score=0", "tracker.min_agreement=0", "tracker.max_coast_frames=100000")
    proc = _start_live(checkpoint, endpoint, *(a for kv in trust for a in ("--set", kv)))
    frames: list[MaskFrame] = []
    degraded: set[str] = set()
    restored: list[int] = []
    try:
        with MaskSubscriber(endpoint, timeout_ms=120_000) as sub:
            for victim in ("decoder", "publisher", "tracker", "decoder"):
                first = sub.recv(120_000)
                assert first is not None, f"no masks before the {victim} kill"
                frames.append(first)
                events = _kill_and_follow(proc.pid, victim, sub)
                frames += [e for _, e in events if isinstance(e, MaskFrame)]
                degraded |= {node for _, node in _states(events, "degraded")}
                restored += [
                    e.detail["restored_after_frame"]
                    for _, e in events
                    if getattr(e, "node", None) == "tracker" and "restored_after_frame" in e.detail
                ]
                if victim == "tracker":
                    after = [e for _, e in events if isinstance(e, MaskFrame)][-1]
                    assert [t.track_id for t in after.tracks] == [1], after.tracks
                assert proc.poll() is None, "the run ended"
        proc.send_signal(signal.SIGTERM)
        stdout, _stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for key in ("seq", "frame_index"):
        values = [getattr(f, key) for f in frames]
        assert all(b > a for a, b in itertools.pairwise(values)), f"{key} went back: {values}"
    seconds = [f.time_seconds for f in frames]
    assert all(b > a for a, b in itertools.pairwise(seconds)), f"time went back: {seconds}"
    assert frames[-1].session >= 2, "each new decoder is a new session of the stream"
    assert "decoder" in degraded, "consumers were not told"
    assert stdout.count("decoder died") == 2 and "publisher died" in stdout, stdout
    assert "tracker died" in stdout, stdout
    assert restored, "the new tracker did not restore the tracks"
    assert all(f.tracks and f.tracks[0].track_id == 1 for f in frames), "the track was lost"


def test_offline_run_resumes_exactly_after_encoder_kills(checkpoint: Path, tmp_path: Path) -> None:
    # Long enough that the encoder is still at work at the third kill: it runs ahead of the
    # publisher by up to the queues' worth of frames (~30), more so on a loaded machine.
    clip = make_clip(tmp_path / "clip.mp4", frames=100, size=(160, 120), fps=10)
    common = _offline_args(clip, checkpoint)
    full = samstream("run", *common, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = _start(["run", *common, "--out", str(out)])
    encoder: int | None = None
    written_at_kill = 0
    try:
        for _ in range(3):
            deadline = time.monotonic() + 240
            # Wait for progress past the last kill (frames the resumed run wrote, not those
            # in flight at the kill), then kill the encoder again.
            while len(list((out / "masks").glob("*.png"))) < written_at_kill + 6:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
            encoder = _node_pid(proc.pid, "encoder", not_pid=encoder)
            os.kill(encoder, signal.SIGKILL)
            while alive(encoder):
                time.sleep(0.05)
            # The frames in flight at the kill are still written; the count is settled once
            # it stops growing (the restarted nodes take seconds to import their models).
            written_at_kill = -1
            while (count := len(list((out / "masks").glob("*.png")))) != written_at_kill:
                written_at_kill = count
                time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout.count("encoder died") == 3, stdout
    _assert_same_outputs(out, tmp_path / "full")


def _assert_same_outputs(out: Path, full: Path) -> None:
    """``out`` holds exactly the files of the uninterrupted run in ``full``, nothing else."""
    names = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == names
    for name in names:
        if name != "overlay.mp4":  # the same frames, but re-encoded across attempts
            assert (out / name).read_bytes() == (full / name).read_bytes(), name
    assert not (out / ".samstream").exists()


def test_offline_run_survives_a_killed_publisher_and_a_death_while_resuming(
    checkpoint: Path, tmp_path: Path
) -> None:
    """A publisher killed with SIGKILL records nothing of its outputs; the encoder of the
    resumed attempt then dies while the nodes start again. The run still ends with the
    outputs of an uninterrupted run, and no unfinished file is left."""
    clip = make_clip(tmp_path / "clip.mp4", frames=60, size=(160, 120), fps=10)
    common = _offline_args(clip, checkpoint)
    full = samstream("run", *common, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = _start(["run", *common, "--out", str(out)])
    try:
        deadline = time.monotonic() + 240
        while len(list((out / "masks").glob("*.png"))) < 6:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        encoder = _node_pid(proc.pid, "encoder")
        publisher = _node_pid(proc.pid, "publisher")
        os.kill(publisher, signal.SIGKILL)
        # The launcher stops the others and starts all four again: kill the new encoder
        # as soon as it exists, while the attempt is still starting.
        os.kill(_node_pid(proc.pid, "encoder", not_pid=encoder), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "publisher died" in stdout and "encoder died" in stdout, stdout
    assert "the publisher left no record of its outputs" in stderr
    _assert_same_outputs(out, tmp_path / "full")


def test_forged_status_messages_are_not_believed(checkpoint: Path, tmp_path: Path) -> None:
    """Anyone who can reach the status endpoint may send "node encoder failed": without the
    run's token the launcher ignores it, and the feed never shows the token."""
    import threading

    import zmq

    from pipeline.wire.messages import StatusMessage
    from pipeline.wire.transport import send_message

    clip = make_clip(tmp_path / "clip.mp4", frames=60, size=(160, 120), fps=10)
    status_port = free_port()
    publish_port = next(p for p in iter(free_port, None) if p != status_port)
    status = f"tcp://127.0.0.1:{status_port}"
    endpoint = f"tcp://127.0.0.1:{publish_port}"
    proc = _start(
        [
            "run",
            "--source",
            str(clip),
            "--box",
            "10",
            "40",
            "50",
            "80",
            "--weights",
            str(checkpoint),
            *FAST,
            "--set",
            f"transport.status={json.dumps(status)}",
            "--set",
            f"transport.publish={json.dumps(endpoint)}",
        ]
    )
    ctx = zmq.Context()
    stop = threading.Event()

    def forge() -> None:
        """Forged "failed" messages for the whole run, from its start-up to its end: a
        forger does not wait for a convenient moment."""
        forger = ctx.socket(zmq.PUSH)
        forger.setsockopt(zmq.LINGER, 0)
        forger.setsockopt(zmq.SNDHWM, 10)
        forger.connect(status)
        try:
            for node in itertools.cycle(("encoder", "publisher", "intruder")):
                if stop.wait(0.1):
                    return
                forged = StatusMessage(
                    node=node,
                    state="failed",
                    time=time.time(),
                    detail={"error": "forged", "run_token": "guess"},
                )
                try:
                    send_message(forger, forged, flags=zmq.NOBLOCK)
                except zmq.Again:  # not connected yet, or the queue is full
                    pass
        finally:
            forger.close()

    forger = threading.Thread(target=forge, daemon=True)
    forger.start()
    statuses = []
    try:
        with MaskSubscriber(endpoint, timeout_ms=120_000) as sub:
            # Follow the feed while the run lasts; its exit (whatever the code) ends the wait.
            while sub.last_end is None and proc.poll() is None:
                event = sub.recv_event(500)
                if hasattr(event, "state"):
                    statuses.append(event)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop.set()
        forger.join(10)
        ctx.term()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "frames in 60, out 60" in stdout
    assert "ignoring a status message that no node of this run sent" in stderr
    assert statuses and all("run_token" not in s.detail for s in statuses)
    assert not any(s.detail.get("error") == "forged" for s in statuses)
