"""Starting a run: the checks before any node starts, the endpoints and outputs it plans,
then its `Supervisor` (`pipeline.run.supervisor`) until the summary.

`run_pipeline` starts every node as its own process (``samstream node NAME --run-file
FILE``), or as threads of this process over inproc:// (tests, small machines), then watches
the status messages every node sends: a node that fails or dies is restarted (a live run's
alone, the others running on, from a spare process that has done its imports where there
is one; an offline run's from the outputs written so far), past the restart budget the run
fails loudly, a signal ends it cleanly within seconds, and nothing is left running.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import msgspec

from pipeline.config import RunConfig
from pipeline.run.graph import GRAPH
from pipeline.run.live import is_live, resolve_run_config
from pipeline.run.preflight import check_source, preflight
from pipeline.run.resume import plan_outputs
from pipeline.run.summary import RunSummary
from pipeline.run.supervisor import Supervisor


def resolve_endpoints(config: RunConfig, run_dir: Path, *, in_process: bool) -> RunConfig:
    """Fill every endpoint left empty: ipc:// files in the run directory, or inproc://."""
    tag = uuid.uuid4().hex[:8]
    links = {key for spec in GRAPH for key in (spec.input, spec.control) if key} | {"status"}
    updates = {}
    for name in sorted(links):
        if not getattr(config.transport, name):
            updates[name] = (
                f"inproc://samstream-{tag}-{name}" if in_process else f"ipc://{run_dir / name}"
            )
    return msgspec.structs.replace(
        config, transport=msgspec.structs.replace(config.transport, **updates)
    )


def run_pipeline(
    config: RunConfig, *, in_process: bool = False, progress: bool = False
) -> RunSummary:
    """Run the graph to the end of its stream, or until SIGTERM/SIGINT (then the summary
    says ``stopped_by``, and an offline run's outputs hold every frame finished by then).
    Raises `pipeline.run.supervisor.RunFailed` when a node fails; before any node starts,
    the errors of `pipeline.run.preflight` (source, weights, devices, prompts, the feed's
    port) and ResumeError for a ``resume.enabled`` run that cannot continue its output
    directory."""
    check_source(config)  # before resolving "auto" imports torch: a second or more
    config = resolve_run_config(config)
    config = preflight(config, live=is_live(config))
    point = plan_outputs(config, resume_wanted=config.resume.enabled)
    run_dir = Path(tempfile.mkdtemp(prefix="samstream-"))
    try:
        config = resolve_endpoints(config, run_dir, in_process=in_process)
        supervisor = Supervisor(
            config, run_dir, resume_point=point, in_process=in_process, progress=progress
        )
        return supervisor.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
