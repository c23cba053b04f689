"""What an interrupted offline run leaves behind so that ``samstream run --resume`` can
continue it, and the checks that a resume continues the same job.

An offline run keeps a small state directory, ``.samstream/`` under its output directory:

- ``run.json``: the run's identity (source file, weights, every setting that changes a mask)
  and how it stands: ``running``, or ``interrupted`` with the number of frames complete
  in the outputs. A run that finishes removes the directory: its outputs are complete.
- ``tracker.npz``: the tracker's state after each of its last few frames (the Kalman
  filters, the previous masks used as prompts), written when it is stopped. A resumed run
  restarts the tracker from the state after the last complete frame, so its outputs are
  the ones an uninterrupted run would have written; without that state the tracker starts
  afresh at frame 0 and the publisher skips the frames it already has.

A live run keeps the same tracker state (its latest only, saved about every second) in its
run directory while it runs, so that a tracker restarted after a death goes on with the
tracks (``NodeRuntime.state_path``), written by a thread of its own (``LiveStateWriter``).

Everything here is plain JSON and ``numpy.savez`` arrays (no pickle: the files may be edited
or planted by anyone who can write the output directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig, config_to_dict
from pipeline.outputs.atomic import AtomicFile, write_atomic
from pipeline.run.live import is_live

log = logging.getLogger(__name__)

STATE_DIR = ".samstream"
RUN_FILE = "run.json"
TRACKER_FILE = "tracker.npz"
STATE_VERSION = 1

# Settings that change how a run goes but not what it writes: a resume may change them.
_NOT_IDENTITY = {
    "decoder": {
        "max_frames",
        "open_timeout_s",
        "read_timeout_s",
        "reconnect_initial_s",
        "reconnect_max_s",
        "give_up_after_s",
    },
    "encoder": {"threads", "batch_size"},
    "tracker": {"threads"},
    "publisher": {"status_interval_s", "out"},  # the directory may move
}
_NOT_IDENTITY_SECTIONS = {"transport", "resume", "live"}


class ResumeError(ValueError):
    """A resume that cannot continue this output directory; the message says why."""


def state_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / STATE_DIR


def _file_identity(path: str) -> dict[str, Any]:
    """A file by content: size and SHA-256 of its first and last MiB (a whole-file hash of a
    long video would take seconds at every start)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(1 << 20))
        if size > 2 << 20:
            file.seek(-(1 << 20), os.SEEK_END)
            digest.update(file.read(1 << 20))
    return {"size": size, "sha256_ends": digest.hexdigest()}


def run_identity(config: RunConfig, *, weights_path: str | None = None) -> dict[str, Any]:
    """What makes two runs the same job: the source, the weights and every setting that
    changes a mask, as plain data (compared key by key at a resume)."""
    data = config_to_dict(config)
    identity: dict[str, Any] = {}
    for section, values in data.items():
        if section in _NOT_IDENTITY_SECTIONS:
            continue
        if isinstance(values, dict):
            skip = _NOT_IDENTITY.get(section, set())
            identity[section] = {k: v for k, v in values.items() if k not in skip}
        else:
            identity[section] = values
    source = config.decoder.source
    if source and os.path.isfile(source):
        identity["source_file"] = _file_identity(source)
    if weights_path and os.path.isfile(weights_path):
        identity["weights_file"] = _file_identity(weights_path)
        identity.pop("weights", None)  # the same file under another path is the same job
    return json.loads(json.dumps(identity))  # tuples -> lists, as they come back from JSON


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else key
            if key not in old or key not in new:
                found.append(where)
            else:
                found += _differences(old[key], new[key], where)
        return found
    return [] if old == new else [path]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0o600: the run's identity holds its whole config (sources, paths): the owner's only.
    write_atomic(path, json.dumps(data, indent=1).encode(), mode=0o600)


def _read_run(out_dir: Path) -> dict[str, Any] | None:
    path = state_dir(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ResumeError(f"cannot resume: {path} is unreadable ({err})") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ResumeError(f"cannot resume: {path} is not a samstream {STATE_VERSION} run state")
    return data


def begin_run(out_dir: str | Path, identity: Mapping[str, Any]) -> None:
    """Record that a (new or resumed) run writes into ``out_dir``."""
    _write_json(
        state_dir(out_dir) / RUN_FILE,
        {"version": STATE_VERSION, "state": "running", "identity": dict(identity)},
    )


def mark_interrupted(out_dir: str | Path, frames_done: int) -> None:
    """The run stopped with its first ``frames_done`` frames complete in every output."""
    path = state_dir(out_dir) / RUN_FILE
    data = _read_run(Path(out_dir)) or {"version": STATE_VERSION, "identity": {}}
    data.update(state="interrupted", frames_done=int(frames_done))
    _write_json(path, data)


def forget_run(out_dir: str | Path) -> None:
    """Nothing is left to resume: the outputs are complete, or a failed run removed them."""
    directory = state_dir(out_dir)
    for name in (RUN_FILE, TRACKER_FILE):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # someone else's files are in it: leave them


def interrupted_frames(out_dir: str | Path) -> int | None:
    """Frames complete in an interrupted run's outputs, None when it was not interrupted."""
    data = _read_run(Path(out_dir))
    if data is None or data.get("state") != "interrupted":
        return None
    return int(data.get("frames_done", 0))


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: the publisher after ``frames_done`` complete frames, the
    tracker from its state after ``tracker_frame`` (None: afresh from frame 0)."""

    frames_done: int
    tracker_frame: int | None


def plan_resume(out_dir: str | Path, identity: Mapping[str, Any]) -> ResumePoint:
    """Check that ``out_dir`` holds an interrupted run of the same job; where to continue.

    Raises ResumeError naming what differs (source, weights, a setting) or what is missing.
    """
    out_dir = Path(out_dir)
    data = _read_run(out_dir)
    if data is None:
        raise ResumeError(
            f"cannot resume: {out_dir} holds no interrupted run (no {STATE_DIR}/{RUN_FILE}; a "
            "run that finished leaves none): run without --resume"
        )
    if data.get("state") != "interrupted":
        raise ResumeError(
            f"cannot resume: the run in {out_dir} did not stop cleanly (state "
            f"{data.get('state')!r}: killed, or still running), so its outputs are not "
            "complete; run again without --resume"
        )
    differs = _differences(data.get("identity", {}), dict(identity))
    if differs:
        shown = ", ".join(differs[:5]) + (" ..." if len(differs) > 5 else "")
        raise ResumeError(
            f"cannot resume the run in {out_dir}: it was made with a different {shown}; "
            "resume with the same source, weights, prompts and settings, or run without --resume"
        )
    frames_done = int(data.get("frames_done", 0))
    frames = saved_tracker_frames(out_dir)
    usable = [f for f in frames if f < frames_done]
    return ResumePoint(frames_done=frames_done, tracker_frame=max(usable) if usable else None)


FRESH_START = ResumePoint(frames_done=0, tracker_frame=None)  # nothing written before


def plan_outputs(config: RunConfig, *, resume_wanted: bool) -> ResumePoint:
    """An offline run with outputs records what it is (for --resume); a resume checks that
    the interrupted run was the same job and says where to continue."""
    out = config.publisher.out
    if is_live(config) or not out:
        if resume_wanted:
            raise ResumeError(
                "--resume continues an interrupted offline run: it needs --out DIR and a "
                "file source (a live run keeps its outputs when stopped: nothing to resume)"
            )
        return FRESH_START
    identity = run_identity(config, weights_path=config.weights)
    if not resume_wanted:
        frames = interrupted_frames(out)
        if frames:
            log.warning(
                "%s holds an interrupted run (%d frames): starting over; add --resume "
                "to continue it instead",
                out,
                frames,
            )
        begin_run(out, identity)
        return FRESH_START
    point = plan_resume(out, identity)
    begin_run(out, identity)
    tracker = ""
    if point.tracker_frame != point.frames_done - 1:
        first = 0 if point.tracker_frame is None else point.tracker_frame + 1
        tracker = f" (the tracker restarts from frame {first})"
    print(
        f"samstream: resuming {out} after frame {point.frames_done - 1}{tracker}", file=sys.stderr
    )
    return point


# -- tracker state ------------------------------------------------------------------------


Snapshot = tuple[dict[str, Any], dict[str, np.ndarray]]
"""A tracker's state after one frame: JSON-ready data and named arrays."""


def save_tracker_snapshots(out_dir: str | Path, snapshots: Mapping[int, Snapshot]) -> Path:
    """Write the tracker's states after the given frames (replacing earlier ones)."""
    directory = state_dir(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    manifest: dict[str, Any] = {"version": STATE_VERSION, "frames": {}}
    for frame, (data, named) in snapshots.items():
        manifest["frames"][str(frame)] = {"data": data, "arrays": sorted(named)}
        for name, array in named.items():
            arrays[f"{frame}/{name}"] = np.ascontiguousarray(array)
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    path = directory / TRACKER_FILE
    with AtomicFile(path, mode=0o600) as out:
        np.savez(out.file, **arrays)
    return path


class LiveStateWriter:
    """Writes a live tracker's latest state into ``out_dir`` on a thread of its own, so that
    no frame waits for the disk (200 tracks' state is about 50 MB: 0.05-0.15 s to write on
    a 2-core machine). A state handed over while another is written waits, replacing any
    older one waiting: the file always ends with the latest state handed over."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self._changed = threading.Condition()
        self._waiting: tuple[int, Snapshot] | None = None
        self._writing = False
        self._failing = False  # the last write failed (logged once, until one succeeds)
        self._thread: threading.Thread | None = None

    def submit(self, frame: int, snapshot: Snapshot) -> None:
        """Save ``snapshot``, the state after ``frame``, soon; returns at once. The arrays
        must not change afterwards (`PromptTracker.snapshot` gives such)."""
        with self._changed:
            self._waiting = (frame, snapshot)
            if self._thread is None:
                # A daemon: a process that exits mid-write leaves the previous file whole
                # (the write goes to a temporary file, renamed when complete).
                self._thread = threading.Thread(
                    target=self._write_forever, name="live-state-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every state handed over is written (True), or ``timeout`` s (False)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._waiting is None and not self._writing, timeout
            )

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                while self._waiting is None:
                    self._changed.wait()
                (frame, snapshot), self._waiting = self._waiting, None
                self._writing = True
            try:
                save_tracker_snapshots(self.out_dir, {frame: snapshot})
            except Exception as err:  # the thread must live on: the next state may succeed
                if not self._failing:
                    log.warning("tracker: could not save its live state (%s); retrying", err)
                self._failing = True
            else:
                if self._failing:
                    log.info("tracker: live state saved again (after frame %d)", frame)
                self._failing = False
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()


def _open_tracker_file(out_dir: str | Path) -> tuple[Any, dict[str, Any]] | None:
    path = state_dir(out_dir) / TRACKER_FILE
    if not path.is_file():
        return None
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None  # a damaged state costs the resume its shortcut, not its correctness
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return None  # a plain .npy array under the state's name, no archive to close
    try:
        manifest = json.loads(archive["manifest"].tobytes().decode())
        if (
            isinstance(manifest, dict)
            and manifest.get("version") == STATE_VERSION
            and isinstance(manifest.get("frames"), dict)
        ):
            return archive, manifest
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # damaged as well
    archive.close()  # an archive that is no usable state is not left open
    return None


def saved_tracker_frames(out_dir: str | Path) -> list[int]:
    """The frames after which a tracker state was saved in ``out_dir``."""
    opened = _open_tracker_file(out_dir)
    if opened is None:
        return []
    archive, manifest = opened
    archive.close()
    return sorted(int(frame) for frame in manifest.get("frames", {}))


def load_tracker_snapshot(out_dir: str | Path, frame: int) -> Snapshot:
    """The tracker's state saved after ``frame``; ResumeError when there is none."""
    missing = f"no tracker state after frame {frame} in {state_dir(out_dir)}"
    opened = _open_tracker_file(out_dir)
    if opened is None:
        raise ResumeError(missing)
    archive, manifest = opened
    with archive:  # closed on every way out, a missing frame's too
        entry = manifest.get("frames", {}).get(str(frame))
        if entry is None:
            raise ResumeError(missing)
        return entry["data"], {name: archive[f"{frame}/{name}"] for name in entry["arrays"]}
