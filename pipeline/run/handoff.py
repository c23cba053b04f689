"""What the launcher hands a node besides the run's config: the node's runtime.

A node the launcher starts reads one run file (``samstream node NAME --run-file FILE``): the
run's config and a `NodeRuntime`. Nothing travels in environment variables, and nothing of
the runtime is a key of the user's config (a node started by hand, with ``--config``, gets
the default runtime: no launcher, no token, a fresh start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from pipeline.config import RunConfig, config_from_dict, config_to_dict


class NodeRuntime(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """launcher_pid: the process whose death stops this node (None: started by hand);
    status_token: the run's secret that signs this node's status messages; state_dir: in a
    live run, where the node saves what its restart continues from (the decoder's stream
    position, the tracker's tracks); frames_done / tracker_frame: a resumed offline run's
    point (`pipeline.run.resume.ResumePoint`): the publisher starts after ``frames_done``
    complete frames, the tracker (and the decoder) after ``tracker_frame`` (None: frame 0)."""

    launcher_pid: int | None = None
    status_token: str | None = None
    state_dir: str | None = None
    frames_done: int = 0
    tracker_frame: int | None = None

    def state_path(self, name: str) -> str | None:
        """Where a live node's restart state named ``name`` lives (None: nowhere)."""
        return None if self.state_dir is None else str(Path(self.state_dir) / name)


class _RunFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    config: dict[str, Any]
    runtime: NodeRuntime


def write_run_file(path: Path, config: RunConfig, runtime: NodeRuntime) -> Path:
    path.write_bytes(msgspec.json.encode(_RunFile(config_to_dict(config), runtime)))
    return path


def read_run_file(path: str | Path) -> tuple[RunConfig, NodeRuntime]:
    try:
        run = msgspec.json.decode(Path(path).read_bytes(), type=_RunFile)
    except (OSError, msgspec.DecodeError) as err:
        raise ValueError(f"{path}: not a run file of the launcher: {err}") from None
    return config_from_dict(run.config, source=str(path)), run.runtime
