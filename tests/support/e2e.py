"""Helpers of the end-to-end tests: free ports, the samstream command, processes, feeds."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import av

from pipeline.wire.client import MaskSubscriber

VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
FAST = ["--image-size", "256"]  # the full graph, at a size a 2-core CI machine runs quickly


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (nothing listens there now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def input_pts(path: Path, limit: int | None = None) -> list[int | None]:
    with av.open(str(path)) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    return pts[:limit] if limit else pts


def input_seconds(path: Path, limit: int | None = None) -> list[float]:
    with av.open(str(path)) as container:
        times = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    return times[:limit] if limit else times


def collect(sub: MaskSubscriber, sink: list) -> threading.Thread:
    def run() -> None:
        try:
            sink.extend(sub)
        except TimeoutError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def samstream(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
