"""Starting, wiring and supervising the four nodes of a run, and the summary at its end.

`run_pipeline` starts every node as its own process (`samstream node NAME --config FILE`),
or as threads of this process over inproc:// (tests, small machines), then watches the
status messages every node sends: a node that fails or dies is restarted (a live run's
alone, the others running on, from a spare process that has done its imports where there
is one; an offline run's from the outputs written so far), past the restart budget the run
fails loudly, a signal ends it cleanly within seconds, and nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq
from tqdm import tqdm

from pipeline.config import RunConfig, config_to_dict
from pipeline.infer.machine import available_cores
from pipeline.run import resume
from pipeline.run.graph import NODE_NAMES, build_node, links, node_endpoints
from pipeline.run.live import is_live, resolve_run_config
from pipeline.run.preflight import check_source, preflight
from pipeline.run.resume import ResumeError
from pipeline.run.runtime import STATUS_TOKEN_KEY, NodeRunner, Shutdown
from pipeline.run.stream_position import POSITION_FILE_ENV
from pipeline.wire.curve import CurveSecurity, exposure_warnings, prompt_key_hint
from pipeline.wire.messages import StatusMessage
from pipeline.wire.transport import (
    STATUS_LINK_OPTIONS,
    MessageReceiver,
    SocketOptions,
    open_socket,
    send_message,
)

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
# A node that dies is started again, this many times within RESTART_WINDOW_S at most;
# one more death in that window fails the run, with the history.
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
# A live run keeps a spare process of each of these nodes, started ahead with its imports
# done (torch and the rest: 2-5 s on a CPU, most of a cold restart), so that a restart only
# loads the model. The decoder and the publisher start in well under a second anyway.
SPARE_NODES = ("encoder", "tracker")


class RunFailed(RuntimeError):
    """A node failed or died; the message names it and says why."""


def resolve_endpoints(config: RunConfig, run_dir: Path, *, in_process: bool) -> RunConfig:
    """Fill every endpoint left empty: ipc:// files in the run directory, or inproc://."""
    tag = uuid.uuid4().hex[:8]
    updates = {}
    for name in ("frames", "embeddings", "masks", "control", "status"):
        if not getattr(config.transport, name):
            updates[name] = (
                f"inproc://samstream-{tag}-{name}" if in_process else f"ipc://{run_dir / name}"
            )
    return msgspec.structs.replace(
        config, transport=msgspec.structs.replace(config.transport, **updates)
    )


def _plan_outputs(config: RunConfig) -> RunConfig:
    """An offline run with outputs records what it is (for --resume); a resume checks that
    the interrupted run was the same job and says where to continue."""
    out = config.publisher.out
    wanted = config.resume.enabled
    if is_live(config) or not out:
        if wanted:
            raise ResumeError(
                "--resume continues an interrupted offline run: it needs --out DIR and a "
                "file source (a live run keeps its outputs when stopped: nothing to resume)"
            )
        return config
    identity = resume.run_identity(config, weights_path=config.weights)
    if not wanted:
        frames = resume.interrupted_frames(out)
        if frames:
            log.warning(
                "%s holds an interrupted run (%d frames): starting over; add --resume "
                "to continue it instead",
                out,
                frames,
            )
        resume.begin_run(out, identity)
        return config
    point = resume.plan_resume(out, identity)
    resume.begin_run(out, identity)
    print(
        f"samstream: resuming {out} after frame {point.frames_done - 1}"
        + (
            ""
            if point.tracker_frame == point.frames_done - 1
            else f" (the tracker restarts from frame "
            f"{0 if point.tracker_frame is None else point.tracker_frame + 1})"
        ),
        file=sys.stderr,
    )
    return msgspec.structs.replace(
        config,
        resume=msgspec.structs.replace(
            config.resume, frames_done=point.frames_done, tracker_frame=point.tracker_frame
        ),
    )


def node_runner(
    name: str,
    config: RunConfig,
    *,
    context: zmq.Context | None = None,
    status_token: str | None = None,
) -> NodeRunner:
    """The runner of one node; ``status_token`` (default: the one the launcher put in the
    environment) signs its status messages."""
    config = resolve_run_config(config)
    context = context or zmq.Context.instance()
    return NodeRunner(
        build_node(name, config),
        node_endpoints(name, config),
        context=context,
        hwm=config.transport.hwm,
        max_message_bytes=config.transport.max_message_bytes,
        status_interval_s=config.publisher.status_interval_s,
        live=is_live(config),
        status_token=status_token or os.environ.get(RUN_TOKEN_ENV),
        security=CurveSecurity.from_config(config.transport.curve, context),
    )


@dataclass
class RunSummary:
    """What a run did: frame counts, throughput, per-stage milliseconds and, per frame, the
    stage times, latency and budget as the publisher measured them."""

    frames_in: int
    frames_out: int
    wall_s: float
    stages: dict[str, dict[str, Any]]
    outputs: dict[str, str] = field(default_factory=dict)
    mode: str = "offline"
    timings: dict[str, Any] = field(default_factory=dict)  # FrameTimings.summary()
    dropped: dict[str, int] = field(default_factory=dict)  # frames lost before each node
    in_flight: int = 0  # frames a node had taken but not passed on when the run was stopped
    reconnects: int = 0
    stopped_by: str | None = None  # the signal that ended the run, None when it ran out
    interrupted_at: int | None = None  # offline run stopped: frames complete in its outputs
    timestamps: dict[str, Any] = field(default_factory=dict)  # the decoder's repairs, if any
    resumed_frames: int = 0  # frames an interrupted run had written before this one resumed
    restarts: str = ""  # the nodes that died and were restarted, when

    @property
    def fps(self) -> float:
        """Frames out per second of the whole run, model loading included."""
        return self.frames_out / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_fps(self) -> float | None:
        """Frames out per second once the run is in its stride: over its last frames
        (`pipeline.run.live.FrameTimings.steady_fps`), after any backlog that queued while the
        models loaded (None with fewer than 3 frames)."""
        return self.timings.get("steady_fps")

    def format(self) -> str:
        lines = [
            f"frames in {self.frames_in}, out {self.frames_out}, {self.wall_s:.1f} s, "
            f"{self.fps:.2f} frames/s"
            + (f" ({self.steady_fps:.2f} in its stride)" if self.steady_fps else "")
            + f" ({self.mode})"
            + (f", stopped by {self.stopped_by}" if self.stopped_by else ""),
            f"{'stage':<10} {'messages':>8} {'median ms':>10} {'p95 ms':>8}",
        ]
        for name in NODE_NAMES:
            s = self.stages.get(name, {})
            if s.get("messages"):
                lines.append(
                    f"{name:<10} {s['messages']:>8} {s['ms_median']:>10.1f} {s['ms_p95']:>8.1f}"
                )
        ms = self.timings.get("ms", {})
        if self.mode == "live":
            # Budget and latency are live figures: an offline run is lossless and as fast
            # as it goes, so its frames wait in queues by design.
            if ms.get("latency"):
                lines.append(
                    f"per frame: processing median {ms['processing']['median']:.1f} ms, p95 "
                    f"{ms['processing']['p95']:.1f} ms; capture-to-publish latency median "
                    f"{ms['latency']['median']:.1f} ms, p95 {ms['latency']['p95']:.1f} ms"
                )
            share = self.timings.get("share_within_budget")
            if share is not None:
                lines.append(
                    f"budget {self.timings['budget_ms']:g} ms per frame: {100 * share:.1f}% of "
                    f"{self.timings['frames']} frames within it"
                )
            drops = ", ".join(f"before {node} {n}" for node, n in self.dropped.items())
            lines.append(
                f"dropped (newest frame wins): {drops or 'none'}; in flight at "
                f"stop: {self.in_flight}; source reconnects: {self.reconnects}"
            )
        if self.timestamps.get("repaired_frames"):
            methods = ", ".join(
                f"{k} {v}" for k, v in self.timestamps.get("methods", {}).items() if v
            )
            lines.append(
                f"timestamps repaired on {self.timestamps['repaired_frames']} frames from frame "
                f"{self.timestamps.get('first_frame')} ({methods}): the outputs' pts are the "
                "repaired, increasing ones; masks.jsonl keeps the file's as source_pts"
            )
        if self.resumed_frames:
            lines.append(f"resumed after the {self.resumed_frames} frames already written")
        if self.restarts:
            lines.append(f"nodes restarted after dying: {self.restarts}")
        if self.interrupted_at is not None:
            lines.append(
                f"interrupted at frame {self.interrupted_at}: the outputs hold frames 0-"
                f"{self.interrupted_at - 1}, complete; run the same command with --resume to "
                "continue from there"
            )
        lines.extend(f"{kind}: {path}" for kind, path in sorted(self.outputs.items()))
        return "\n".join(lines)


def _dropped(last: dict[str, StatusMessage]) -> dict[str, int]:
    """Frames each node's upstream sent that the node never processed (newest frame wins)."""
    dropped = {}
    for upstream, node in links():
        if upstream in last and node in last:
            sent = last[upstream].counters.get("frames", 0)
            received = last[node].counters.get("frames_in", 0)
            dropped[node] = max(0, sent - received)
    return dropped


def _in_flight(last: dict[str, StatusMessage]) -> int:
    """Frames taken by a node but not passed on: only a stopped run has any."""
    return sum(
        max(0, msg.counters.get("frames_in", 0) - msg.counters.get("frames", 0))
        for name, msg in last.items()
        if name != "decoder"
    )


def summarize(
    last: dict[str, StatusMessage], wall_s: float, mode: str, stopped_by: str | None = None
) -> RunSummary:
    """The summary from each node's last status message."""
    decoder, publisher = last.get("decoder"), last.get("publisher")
    return RunSummary(
        frames_in=decoder.counters.get("frames", 0) if decoder else 0,
        frames_out=publisher.counters.get("frames", 0) if publisher else 0,
        wall_s=wall_s,
        stages={name: msg.detail.get("stats", {}) for name, msg in last.items()},
        outputs=publisher.detail.get("outputs", {}) if publisher else {},
        mode=mode,
        timings=publisher.detail.get("timings", {}) if publisher else {},
        dropped=_dropped(last),
        in_flight=_in_flight(last),
        reconnects=decoder.counters.get("reconnects", 0) if decoder else 0,
        stopped_by=stopped_by,
        interrupted_at=publisher.detail.get("interrupted_at") if publisher else None,
        timestamps=decoder.detail.get("timestamps") or {} if decoder else {},
        resumed_frames=publisher.counters.get("frames_resumed", 0) if publisher else 0,
    )


def cpu_threads(requested: int | None, share: float) -> int:
    """Torch threads for a node process: ``requested``, or ``share`` of the cores this
    process may use (at least 1)."""
    if requested is not None:
        return requested
    return max(1, int(available_cores() * share))


LAUNCHER_PID_ENV = "SAMSTREAM_LAUNCHER_PID"
# A secret per run, handed to the nodes it starts: a status without it is not believed
# (anyone who can reach the status endpoint could otherwise say a node "failed").
RUN_TOKEN_ENV = "SAMSTREAM_RUN_TOKEN"
# A spare's end of the pipe on which it says that its imports are done.
SPARE_READY_FD_ENV = "SAMSTREAM_SPARE_READY_FD"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> None:
    """In a node process the launcher started: be stopped (SIGTERM, a clean stop that keeps
    the outputs) when the launcher dies, by any signal, SIGKILL included, so no node is left
    finishing the job alone. Linux's parent-death signal; a no-op for a node started by hand.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "cannot ask to be stopped with the launcher: %s", os.strerror(ctypes.get_errno())
        )
    if os.getppid() != int(launcher):  # it died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def node_environment(name: str, config: RunConfig, token: str | None = None) -> dict[str, str]:
    """The environment of a node process: its torch thread budget, the launcher's pid and the
    run's status token.

    The nodes are processes on the same cores, and each torch would take every core: on 2
    cores an encoder and a tracker with 2 threads each made a live run's p95 latency about
    twice what it is with 2 and 1. The encoder, the heavy stage, gets every core; the
    tracker's small per-frame work a quarter of them. (Threads of one process, the
    in-process mode, share one torch and are left alone.)"""
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    if token is not None:
        env[RUN_TOKEN_ENV] = token
    threads = {
        "encoder": cpu_threads(config.encoder.threads, share=1.0),
        "tracker": cpu_threads(config.tracker.threads, share=0.25),
    }.get(name)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class _Restarts:
    """Deaths of nodes and the restarts they got, bounded per sliding window."""

    def __init__(self) -> None:
        self.history: list[tuple[float, str, str]] = []  # (monotonic time, node, how)

    def allow(self, node: str, how: str) -> bool:
        """Record a death; True when a restart is within the budget."""
        now = time.monotonic()
        self.history.append((now, node, how))
        recent = [t for t, _, _ in self.history if now - t <= RESTART_WINDOW_S]
        return len(recent) <= MAX_RESTARTS

    def describe(self) -> str:
        start = self.history[0][0] if self.history else 0.0
        return "; ".join(f"{t - start:.1f} s: {node} {how}" for t, node, how in self.history)


# How a node process starts. Not `python -m pipeline.cli`: -m puts the working directory first
# on sys.path, so a user's own pipeline.py or nodes/ there would be imported instead of this
# package and every node would die. The bootstrap drops that entry before importing
# (`python -P` does the same, but only from Python 3.11).
NODE_COMMAND = (
    sys.executable,
    "-c",
    "import sys; sys.path.pop(0); from pipeline.cli import main; sys.exit(main())",
)


class _ProcessWorker:
    """A node process. ``config_path`` None: a spare (``samstream node NAME --standby``),
    which imports what the node needs, says so on a pipe, and waits for `activate`."""

    def __init__(
        self, name: str, config_path: Path | None, log_path: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # a restarted node's log follows its last one
        self._ready: int | None = None  # a spare's pipe: readable once its imports are done
        if config_path is not None:
            args, fds, stdin = ["--config", str(config_path)], (), None
        else:
            self._ready, writer = os.pipe()
            env = {**env, SPARE_READY_FD_ENV: str(writer)}
            args, fds, stdin = ["--standby"], (writer,), subprocess.PIPE
        self.proc = subprocess.Popen(
            [*NODE_COMMAND, "node", name, *args],
            stdin=stdin,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=fds,
        )
        for fd in fds:
            os.close(fd)  # the child's end

    @property
    def spare_ready(self) -> bool:
        """A spare whose imports are done (or that died: then `exit_code` says so)."""
        if self._ready is None:
            return False
        readable, _, _ = select.select([self._ready], [], [], 0)
        return bool(readable)

    def activate(self, config_path: Path) -> None:
        """Make a spare the node: it reads its config from ``config_path`` and runs."""
        if self.proc.stdin is None:
            raise RuntimeError(f"the {self.name} process is not a spare")
        self.proc.stdin.write(f"{config_path}\n".encode())
        self.proc.stdin.close()  # raises BrokenPipeError when the spare has died

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        self._log.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # a spare never taken: its wait ends
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None


class _ThreadWorker:
    def __init__(self, runner: NodeRunner) -> None:
        self.name = runner.node.name
        self.runner = runner
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"samstream-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.runner.run()

    def exit_code(self) -> int | None:
        return None if self.thread.is_alive() else self.code

    def stop(self) -> None:
        self.runner.stop.set()

    def kill(self) -> None:
        self.runner.stop.set()
        self.thread.join(timeout=STOP_GRACE_S * 2)

    def describe_exit(self) -> str:
        return f"exit code {self.code}"

    def log_tail(self, lines: int = 8) -> str:
        return ""

    def close(self) -> None:
        pass


def run_pipeline(
    config: RunConfig, *, in_process: bool = False, progress: bool = False
) -> RunSummary:
    """Run the graph to the end of its stream, or until SIGTERM/SIGINT (then the summary
    says ``stopped_by``, and an offline run's outputs hold every frame finished by then).
    Raises RunFailed when a node fails; before any node starts, the errors of
    `pipeline.run.preflight` (source, weights, devices, prompts, the feed's port) and ResumeError
    for a ``resume.enabled`` run that cannot continue its output directory."""
    check_source(config)  # before resolving "auto" imports torch: a second or more
    config = resolve_run_config(config)
    config = preflight(config, live=is_live(config))
    config = _plan_outputs(config)
    run_dir = Path(tempfile.mkdtemp(prefix="samstream-"))
    config = resolve_endpoints(config, run_dir, in_process=in_process)
    context = zmq.Context() if in_process else zmq.Context.instance()
    # The launcher's own ends of the status link and the relay to the publisher.
    security = CurveSecurity.from_config(config.transport.curve, context)
    status_sock = open_socket(
        context,
        zmq.PULL,
        config.transport.status,
        bind=True,
        options=STATUS_LINK_OPTIONS,
        security=security.server(config.transport.status, link=True) if security else None,
    )
    statuses = MessageReceiver(status_sock)
    # Every node's status goes on to the publisher, which puts it on the PUB socket: the
    # consumers of the masks see a camera reconnecting or a node failing.
    relay = open_socket(
        context,
        zmq.PUSH,
        config.transport.masks,
        bind=False,
        options=SocketOptions(linger_ms=0, sndhwm=100, rcvhwm=100),
        security=security.client(config.transport.masks) if security else None,
    )
    workers: list[Any] = []
    last: dict[str, StatusMessage] = {}
    failures: dict[str, str] = {}  # node -> the error its "failed" status gave
    token = secrets.token_hex(16)
    forged = [0]  # status messages without the run's token
    restarts = _Restarts()
    attempt_start = [config.resume.frames_done]  # frames complete when this attempt began
    spares: dict[str, _ProcessWorker] = {}  # live: a waiting process per SPARE_NODES node
    started: dict[str, float] = {}  # per node: when its current process started (time.time)
    no_spare: set[str] = set()  # nodes whose spare died on its own
    start = time.monotonic()
    bar = None
    stopped_by: str | None = None
    live = is_live(config)

    def relay_status(msg: StatusMessage) -> None:
        try:
            send_message(relay, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the publisher is busy or gone; the next status says the same

    def collect(timeout_ms: int) -> None:
        msg = statuses.recv(timeout_ms)
        while msg is not None:
            if isinstance(msg, StatusMessage):
                if msg.detail.get(STATUS_TOKEN_KEY) != token or msg.node not in NODE_NAMES:
                    forged[0] += 1
                    if forged[0] == 1:
                        log.warning(
                            "ignoring a status message that no node of this run sent "
                            "(node %r, state %r): ignoring such messages from now on",
                            msg.node,
                            msg.state,
                        )
                    msg = statuses.recv(0)
                    continue
                msg = msgspec.structs.replace(
                    msg, detail={k: v for k, v in msg.detail.items() if k != STATUS_TOKEN_KEY}
                )
                last[msg.node] = msg
                if msg.node != "publisher":
                    relay_status(msg)
                if msg.state == "failed":
                    # Its process exits next: the supervision below restarts it or fails.
                    failures[msg.node] = str(msg.detail.get("error"))
            msg = statuses.recv(0)

    def write_config(name: str, node_config: RunConfig) -> Path:
        path = run_dir / f"config-{name}.json"
        path.write_text(json.dumps(config_to_dict(node_config)))
        return path

    def node_process(name: str, node_config: RunConfig | None) -> _ProcessWorker:
        """The ``name`` node started with ``node_config``; None: a spare of it."""
        env = node_environment(name, config, token)
        if name == "decoder" and live:
            env[POSITION_FILE_ENV] = str(run_dir / "decoder.position")
        if name == "tracker" and live:
            env[resume.LIVE_STATE_ENV] = str(run_dir / "tracker")
        path = None if node_config is None else write_config(name, node_config)
        return _ProcessWorker(name, path, run_dir / f"{name}.log", env)

    def start_process(name: str, node_config: RunConfig) -> _ProcessWorker:
        """The ``name`` node running ``node_config``: a live run's spare of it if there is
        one (its imports are done, or under way), else a new process."""
        started[name] = time.time()
        spare = spares.pop(name, None)
        if spare is not None:
            ready = spare.spare_ready
            try:
                spare.activate(write_config(name, node_config))
            except BrokenPipeError:  # nobody reads the pipe: the spare has died
                log.warning("node %s: its spare had died; starting a new process", name)
                spare.kill()
                spare.close()
            else:
                log.warning(
                    "node %s: a spare took over (%s)",
                    name,
                    "its imports were done" if ready else "it was still importing",
                )
                return spare
        return node_process(name, node_config)

    def keep_spares() -> None:
        """A live run's spares: one per SPARE_NODES node once that node runs, started one
        at a time (importing torch takes a core for seconds: two at once would slow the
        running nodes twice as long)."""
        if in_process or not live:
            return
        for name, spare in list(spares.items()):
            if spare.exit_code() is not None:  # nothing killed it: it cannot start here
                log.warning(
                    "a spare %s process died (%s): restarts of it start a new process",
                    name,
                    spare.describe_exit(),
                )
                spares.pop(name).close()
                no_spare.add(name)
        if any(not s.spare_ready for s in spares.values()):
            return
        for name in SPARE_NODES:
            status = last.get(name)
            if (
                name not in spares
                and name not in no_spare
                and status is not None
                and status.state == "running"
                and status.time >= started.get(name, float("inf"))
            ):
                spares[name] = node_process(name, None)
                return

    def restart(dead: Any, how: str) -> list[Any]:
        """The workers after ``dead`` died: it restarted alone (live), every node
        restarted from the outputs written so far (offline), or RunFailed."""
        tail = dead.log_tail()
        failure = f"node {dead.name} {how}" + (f"\n{tail}" if tail else "")
        if in_process:
            raise RunFailed(failure)  # its threads share the launcher's process
        if live and dead.name == "publisher" and config.publisher.out:
            raise RunFailed(
                f"{failure}\n(a live run's outputs are finished when it stops: those in "
                f"{config.publisher.out} died with the publisher, so the run ends)"
            )
        if not live and not config.publisher.out:
            raise RunFailed(f"{failure}\n(an offline run resumes after a death from its --out)")
        if not restarts.allow(dead.name, how):
            raise RunFailed(
                f"{failure}\n{len(restarts.history)} node deaths, more than "
                f"{MAX_RESTARTS} in {RESTART_WINDOW_S:g} s: {restarts.describe()}"
            )
        log.warning("node %s %s: restarting it", dead.name, how)
        relay_status(
            StatusMessage(
                node=dead.name,
                state="degraded",
                time=time.time(),
                detail={"restarting": True, "why": how, "restarts": len(restarts.history)},
            )
        )
        failures.pop(dead.name, None)
        if live:
            # The others run on; the new node binds the same endpoints (ZeroMQ reconnects).
            # A new tracker restores the tracks its predecessor last saved (within a second
            # of its death; resume.LIVE_STATE_ENV), or, when it died before its first
            # frame, starts from the configured prompts.
            # A new decoder continues the stream's numbering (see pipeline.run.stream_position);
            # a new publisher binds the port its predecessor had ("auto" picked one).
            node_config = config
            bound = last.get("publisher")
            if dead.name == "publisher" and bound is not None and "publish" in bound.detail:
                node_config = msgspec.structs.replace(
                    config,
                    transport=msgspec.structs.replace(
                        config.transport, publish=str(bound.detail["publish"])
                    ),
                )
            dead.close()
            return [start_process(dead.name, node_config) if w is dead else w for w in workers]
        # Offline: stop the others as Ctrl-C would (the publisher keeps every frame it
        # wrote, the tracker its state), then resume: the outputs come out as they would
        # have without the death.
        _stop_all(workers)
        collect(200)
        for w in workers:
            w.close()
        out = config.publisher.out
        if resume.interrupted_frames(out) is None:
            # The publisher did not record where its outputs end: it was killed, or stopped
            # before it had opened them. A writer renames its files into place only when
            # it closes, so those under their final names are still the ones this attempt
            # started from.
            from pipeline.outputs.files import remove_unfinished  # 0.7 s of imports: not at start

            removed = remove_unfinished(out)
            log.warning(
                "the publisher left no record of its outputs: continuing from frame %d, where "
                "this attempt started (%d unfinished file(s) removed)",
                attempt_start[0],
                len(removed),
            )
            resume.mark_interrupted(out, attempt_start[0])
        resumed = msgspec.structs.replace(
            config, resume=msgspec.structs.replace(config.resume, enabled=True)
        )
        resumed = _plan_outputs(resumed)
        attempt_start[0] = resumed.resume.frames_done
        last.clear()
        return [start_process(name, resumed) for name in NODE_NAMES]

    try:
        if in_process:
            for name in reversed(NODE_NAMES):  # consumers first: their inputs are bound
                runner = node_runner(name, config, context=context, status_token=token)
                workers.append(_ThreadWorker(runner))  # the runner has its own stop event
        else:
            workers = [start_process(name, config) for name in NODE_NAMES]
        print(
            f"samstream: {config.live.mode} run, encoder on {config.encoder.device} at "
            f"{config.encoder.image_size} px; prompts: samstream prompt list --endpoint "
            f"{config.transport.control}{prompt_key_hint(config.transport)}",
            file=sys.stderr,
        )
        for warning in exposure_warnings(config.transport):  # once per endpoint
            print(f"samstream: warning: {warning}", file=sys.stderr)
        feed_announced = False
        while True:
            collect(100)
            keep_spares()
            publisher = last.get("publisher")
            if not feed_announced and publisher is not None and "publish" in publisher.detail:
                # Known once the publisher has bound it ("auto": the first free port).
                print(f"samstream: masks on {publisher.detail['publish']}", file=sys.stderr)
                feed_announced = True
            if progress:
                bar = _update_progress(bar, last, is_live(config))
            codes = {w.name: w.exit_code() for w in workers}
            if any(
                code == 0
                and last.get(name) is not None
                and last[name].state not in ("done", "stopped")
                for name, code in codes.items()
            ):
                collect(200)  # a clean exit can be seen before its last status arrives
            for w in workers:
                code = codes[w.name]
                state = last[w.name].state if w.name in last else "never reported"
                if code is not None and (code != 0 or state not in ("done", "stopped")):
                    if w.name in failures:
                        workers = restart(w, f"failed: {failures[w.name]}")
                    else:
                        workers = restart(w, f"died ({w.describe_exit()}, last state: {state})")
                    break  # one death at a time: the next look sees the new workers
            else:
                if all(code == 0 for code in codes.values()):
                    break  # no node died, and every one has ended cleanly: the run is over
    except (Shutdown, KeyboardInterrupt) as stop:
        # The usual end of a live run: stop every node, then report what they did.
        stopped_by = str(stop) or "SIGINT"
        _stop_all(workers)
        with contextlib.suppress(RunFailed):
            collect(0)
    finally:  # also after a RunFailed: stop every node and spare, then raise it
        _stop_all([*workers, *spares.values()])
        for w in [*workers, *spares.values()]:
            w.close()
        if bar is not None:
            bar.close()
        relay.close(linger=0)
        status_sock.close(linger=0)
        if security is not None:
            security.close()
        if in_process:
            context.term()
        shutil.rmtree(run_dir, ignore_errors=True)
    summary = summarize(last, time.monotonic() - start, config.live.mode, stopped_by)
    summary.restarts = restarts.describe()
    return summary


def _update_progress(bar: tqdm | None, last: dict[str, StatusMessage], live: bool) -> tqdm | None:
    """Frames published: out of the total where the container (or --max-frames) gives one,
    so the bar has an ETA; a live run shows its latency and drops instead."""
    decoder, publisher = last.get("decoder"), last.get("publisher")
    if bar is None and decoder is not None and "frame_count_hint" in decoder.detail:
        bar = tqdm(
            total=None if live else decoder.detail.get("frame_count_hint"),
            unit="frame",
            desc="samstream",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    if bar is not None and publisher is not None:
        done = publisher.counters.get("frames", 0) + publisher.counters.get("frames_resumed", 0)
        if live:
            latency = (publisher.detail.get("interval") or {}).get("latency_ms") or {}
            dropped = sum(_dropped(last).values())
            bar.set_postfix_str(
                f"latency {latency.get('median', 0):.0f} ms, dropped {dropped}", refresh=False
            )
        bar.update(done - bar.n)
    return bar


def _stop_all(workers: list[Any]) -> None:
    """SIGTERM everyone, wait up to STOP_GRACE_S, then kill: nothing outlives the run."""
    for w in workers:
        w.stop()
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(w.exit_code() is None for w in workers):
        time.sleep(0.02)
    for w in workers:
        w.kill()
