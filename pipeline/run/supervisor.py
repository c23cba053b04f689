"""The supervisor of a run: it starts the nodes, believes only the statuses signed with the
run's token, relays them to the feed, keeps a live run's spares, restarts the dead as the
graph table says (`pipeline.run.graph.NodeSpec`), stops everyone within a grace period,
and sums the run up from each node's last status."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from pipeline.config import RunConfig
from pipeline.run import resume
from pipeline.run.graph import (
    GRAPH,
    NODE_NAMES,
    SINK,
    NodeSpec,
    build_node,
    node_endpoints,
    node_spec,
)
from pipeline.run.handoff import NodeRuntime, write_run_file
from pipeline.run.live import is_live, resolve_run_config
from pipeline.run.resume import FRESH_START, ResumePoint
from pipeline.run.runtime import STATUS_TOKEN_KEY, NodeRunner, Shutdown
from pipeline.run.summary import RunSummary, summarize, update_progress
from pipeline.run.workers import ProcessWorker, ThreadWorker, Worker, node_environment
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


class RunFailed(RuntimeError):
    """A node failed or died; the message names it and says why."""


def node_runner(
    name: str,
    config: RunConfig,
    runtime: NodeRuntime,
    *,
    context: zmq.Context | None = None,
) -> NodeRunner:
    """The runner of one node, its status messages signed with the runtime's token."""
    config = resolve_run_config(config)
    context = context or zmq.Context.instance()
    return NodeRunner(
        build_node(name, config, runtime),
        node_endpoints(name, config),
        context=context,
        hwm=config.transport.hwm,
        max_message_bytes=config.transport.max_message_bytes,
        status_interval_s=config.publisher.status_interval_s,
        live=is_live(config),
        status_token=runtime.status_token,
        security=CurveSecurity.from_config(config.transport.curve),
    )


class Restarts:
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


class Supervisor:
    """One run's nodes, from start to summary. ``config`` has every endpoint resolved
    (`pipeline.run.launcher.resolve_endpoints`); ``run_dir`` holds the run files, logs and
    a live run's restart state; ``resume_point``: where an offline run's outputs continue
    (`pipeline.run.resume.plan_outputs`, which a restart after a death calls again)."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        resume_point: ResumePoint = FRESH_START,
        in_process: bool = False,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.resume_point = resume_point
        self.in_process = in_process
        self.progress = progress
        self.live = is_live(config)
        # A secret per run, handed to the nodes it starts: a status without it is not
        # believed (anyone who can reach the status endpoint could say a node "failed").
        self.token = secrets.token_hex(16)
        self.context = zmq.Context() if in_process else zmq.Context.instance()
        self.workers: list[Worker] = []
        self.spares: dict[str, ProcessWorker] = {}  # live: a waiting process per spare node
        self.no_spare: set[str] = set()  # nodes whose spare died on its own
        self.started: dict[str, float] = {}  # per node: when its current process started
        self.last: dict[str, StatusMessage] = {}  # per node: its last believed status
        self.failures: dict[str, str] = {}  # node -> the error its "failed" status gave
        self.forged = 0  # status messages without the run's token
        self.restarts = Restarts()
        self.attempt_start = resume_point.frames_done  # frames complete when it began
        self.killed: list[str] = []  # nodes still running after the grace period
        self.bar: Any = None
        self.feed_announced = False
        self._open_links()

    def _open_links(self) -> None:
        """The supervisor's own ends of the status link and of the relay to the sink, which
        puts every node's status on the feed: consumers see a camera reconnecting or a node
        failing."""
        transport = self.config.transport
        self.security = CurveSecurity.from_config(transport.curve)
        server = self.security.server(transport.status, link=True) if self.security else None
        self.status_sock = open_socket(
            self.context,
            zmq.PULL,
            transport.status,
            bind=True,
            options=STATUS_LINK_OPTIONS,
            security=server,
        )
        self.statuses = MessageReceiver(self.status_sock)
        relay_to = getattr(transport, SINK.input or "")
        self.relay = open_socket(
            self.context,
            zmq.PUSH,
            relay_to,
            bind=False,
            options=SocketOptions(linger_ms=0, sndhwm=100, rcvhwm=100),
            security=self.security.client(relay_to) if self.security else None,
        )

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Run the graph to the end of its stream, or until SIGTERM/SIGINT (then the summary
        says ``stopped_by``); RunFailed when a node fails past what its policy restarts."""
        start = time.monotonic()
        stopped_by: str | None = None
        try:
            # One by one: should a start fail, those started before are stopped below.
            for spec in self._start_order():
                self.workers.append(self._start(spec.name, self.config))
            self._announce_run()
            while not self._step():
                pass
        except (Shutdown, KeyboardInterrupt) as stop:
            # The usual end of a live run: stop every node, then report what they did.
            stopped_by = str(stop) or "SIGINT"
            self._stop(self.workers)
            with contextlib.suppress(RunFailed):
                self._collect(0)
        finally:  # also after a RunFailed: stop every node and spare, then raise it
            self._close()
        summary = summarize(self.last, time.monotonic() - start, self.config.live.mode, stopped_by)
        summary.restarts = self.restarts.describe()
        summary.killed = self.killed
        return summary

    def _start_order(self) -> tuple[NodeSpec, ...]:
        # Threads over inproc:// start consumers first, so that their inputs are bound.
        return tuple(reversed(GRAPH)) if self.in_process else GRAPH

    def _announce_run(self) -> None:
        config = self.config
        print(
            f"samstream: {config.live.mode} run, encoder on {config.encoder.device} at "
            f"{config.encoder.image_size} px; prompts: samstream prompt list --endpoint "
            f"{config.transport.control}{prompt_key_hint(config.transport)}",
            file=sys.stderr,
        )
        for warning in exposure_warnings(config.transport):  # once per endpoint
            print(f"samstream: warning: {warning}", file=sys.stderr)

    def _step(self) -> bool:
        """One look at the run: statuses, spares, progress, deaths. True once every node
        has ended cleanly."""
        self._collect(100)
        self._keep_spares()
        self._announce_feed()
        if self.progress and self.feed_announced:  # the bar after the lines above it
            self.bar = update_progress(self.bar, self.last, self.live)
        codes = {w.name: w.exit_code() for w in self.workers}
        if any(code == 0 and not self._ended(name) for name, code in codes.items()):
            self._collect(200)  # a clean exit can be seen before its last status arrives
        for worker in self.workers:
            code = codes[worker.name]
            if code is not None and (code != 0 or not self._ended(worker.name)):
                self._restart(worker, self._how_it_died(worker))
                return False  # one death at a time: the next look sees the new workers
        return all(code == 0 for code in codes.values())

    def _ended(self, name: str) -> bool:
        status = self.last.get(name)
        return status is not None and status.state in ("done", "stopped")

    def _how_it_died(self, worker: Worker) -> str:
        if worker.name in self.failures:
            return f"failed: {self.failures[worker.name]}"
        state = self.last[worker.name].state if worker.name in self.last else "never reported"
        return f"died ({worker.describe_exit()}, last state: {state})"

    def _announce_feed(self) -> None:
        sink = self.last.get(SINK.name)
        if not self.feed_announced and sink is not None and "publish" in sink.detail:
            # Known once the sink has bound it ("auto": the first free port).
            print(f"samstream: masks on {sink.detail['publish']}", file=sys.stderr)
            self.feed_announced = True

    # -- statuses ---------------------------------------------------------------------------

    def _collect(self, timeout_ms: int) -> None:
        """Take every status waiting (the first within ``timeout_ms``)."""
        msg = self.statuses.recv(timeout_ms)
        while msg is not None:
            if isinstance(msg, StatusMessage):
                self._believe(msg)
            msg = self.statuses.recv(0)

    def _believe(self, msg: StatusMessage) -> None:
        if msg.detail.get(STATUS_TOKEN_KEY) != self.token or msg.node not in NODE_NAMES:
            self.forged += 1
            if self.forged == 1:
                log.warning(
                    "ignoring a status message that no node of this run sent (node %r, "
                    "state %r): ignoring such messages from now on",
                    msg.node,
                    msg.state,
                )
            return
        detail = {k: v for k, v in msg.detail.items() if k != STATUS_TOKEN_KEY}
        msg = msgspec.structs.replace(msg, detail=detail)
        self.last[msg.node] = msg
        if msg.node != SINK.name:  # the sink is the feed: it publishes its own
            self._relay(msg)
        if msg.state == "failed":
            # Its process exits next: `_step` restarts it or fails.
            self.failures[msg.node] = str(msg.detail.get("error"))

    def _relay(self, msg: StatusMessage) -> None:
        try:
            send_message(self.relay, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the sink is busy or gone; the next status says the same

    # -- starting nodes ---------------------------------------------------------------------

    def _runtime(self) -> NodeRuntime:
        point = self.resume_point
        return NodeRuntime(
            launcher_pid=os.getpid(),
            status_token=self.token,
            state_dir=str(self.run_dir) if self.live else None,
            frames_done=point.frames_done,
            tracker_frame=point.tracker_frame,
        )

    def _run_file(self, name: str, config: RunConfig) -> Path:
        return write_run_file(self.run_dir / f"{name}.run.json", config, self._runtime())

    def _start(self, name: str, config: RunConfig) -> Worker:
        """The ``name`` node running ``config``: threads (in-process), a live run's spare of
        it if there is one (its imports are done, or under way), else a new process."""
        if self.in_process:
            runner = node_runner(name, config, self._runtime(), context=self.context)
            return ThreadWorker(runner, join_s=STOP_GRACE_S * 2)
        self.started[name] = time.time()
        spare = self.spares.pop(name, None)
        if spare is not None:
            ready = spare.spare_ready
            try:
                spare.activate(self._run_file(name, config))
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
        return self._process(name, self._run_file(name, config))

    def _process(self, name: str, run_file: Path | None) -> ProcessWorker:
        """A process of the ``name`` node (``run_file`` None: a spare of it)."""
        env = node_environment(name, self.config)
        return ProcessWorker(name, run_file, self.run_dir / f"{name}.log", env)

    def _keep_spares(self) -> None:
        """A live run's spares: one per spare node once that node runs, started one at a
        time (importing torch takes a core for seconds: two at once would slow the running
        nodes twice as long)."""
        if self.in_process or not self.live:
            return
        for name, spare in list(self.spares.items()):
            if spare.exit_code() is not None:  # nothing killed it: it cannot start here
                log.warning(
                    "a spare %s process died (%s): restarts of it start a new process",
                    name,
                    spare.describe_exit(),
                )
                self.spares.pop(name).close()
                self.no_spare.add(name)
        if any(not s.spare_ready for s in self.spares.values()):
            return
        for spec in GRAPH:
            status = self.last.get(spec.name)
            if (
                spec.spare
                and spec.name not in self.spares
                and spec.name not in self.no_spare
                and status is not None
                and status.state == "running"
                and status.time >= self.started.get(spec.name, float("inf"))
            ):
                self.spares[spec.name] = self._process(spec.name, None)
                return

    # -- deaths -----------------------------------------------------------------------------

    def _restart(self, dead: Worker, how: str) -> None:
        """After ``dead`` died: restart it alone (live), every node from the outputs
        written so far (offline), or RunFailed when its policy or the budget says so."""
        self._check_restartable(dead, how)
        log.warning("node %s %s: restarting it", dead.name, how)
        self._relay(
            StatusMessage(
                node=dead.name,
                state="degraded",
                time=time.time(),
                detail={"restarting": True, "why": how, "restarts": len(self.restarts.history)},
            )
        )
        self.failures.pop(dead.name, None)
        if self.live:
            self._restart_alone(dead)
        else:
            self._restart_all()

    def _check_restartable(self, dead: Worker, how: str) -> None:
        tail = dead.log_tail()
        failure = f"node {dead.name} {how}" + (f"\n{tail}" if tail else "")
        out = self.config.publisher.out
        if self.in_process:
            raise RunFailed(failure)  # its threads share the launcher's process
        if self.live and dead.name == SINK.name and out:
            raise RunFailed(
                f"{failure}\n(a live run's outputs are finished when it stops: those in "
                f"{out} died with the {SINK.name}, so the run ends)"
            )
        if not self.live and not out:
            raise RunFailed(f"{failure}\n(an offline run resumes after a death from its --out)")
        if not self.restarts.allow(dead.name, how):
            raise RunFailed(
                f"{failure}\n{len(self.restarts.history)} node deaths, more than "
                f"{MAX_RESTARTS} in {RESTART_WINDOW_S:g} s: {self.restarts.describe()}"
            )

    def _restart_alone(self, dead: Worker) -> None:
        """Live: the others run on, the new node binds the same endpoints (ZeroMQ
        reconnects) and continues from the state its predecessor saved in the run
        directory (`NodeRuntime.state_dir`: the stream's numbering, the tracks). A node
        that publishes binds the port its predecessor had ("auto" picked one)."""
        config = self.config
        bound = self.last.get(dead.name)
        if node_spec(dead.name).publish and bound is not None and "publish" in bound.detail:
            transport = msgspec.structs.replace(
                config.transport, publish=str(bound.detail["publish"])
            )
            config = msgspec.structs.replace(config, transport=transport)
        dead.close()
        self.workers = [self._start(w.name, config) if w is dead else w for w in self.workers]

    def _restart_all(self) -> None:
        """Offline: stop the others as Ctrl-C would (the sink keeps every frame it wrote,
        the tracker its state), then resume: the outputs come out as they would have
        without the death."""
        self._stop(self.workers)
        self._collect(200)
        for w in self.workers:
            w.close()
        out = self.config.publisher.out
        if resume.interrupted_frames(out) is None:
            # The sink did not record where its outputs end: it was killed, or stopped
            # before it had opened them. A writer renames its files into place only when it
            # closes, so those under their final names are still the ones this attempt
            # started from.
            from pipeline.outputs.files import remove_unfinished  # 0.7 s of imports

            removed = remove_unfinished(out)
            log.warning(
                "the publisher left no record of its outputs: continuing from frame %d, where "
                "this attempt started (%d unfinished file(s) removed)",
                self.attempt_start,
                len(removed),
            )
            resume.mark_interrupted(out, self.attempt_start)
        self.resume_point = resume.plan_outputs(self.config, resume_wanted=True)
        self.attempt_start = self.resume_point.frames_done
        self.last.clear()
        self.workers = []
        for spec in GRAPH:
            self.workers.append(self._start(spec.name, self.config))

    # -- the end ----------------------------------------------------------------------------

    def _stop(self, workers: list[Worker]) -> None:
        """SIGTERM everyone, wait up to STOP_GRACE_S, then kill: nothing outlives the run.
        Those killed are named in the summary."""
        for w in workers:
            w.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(w.exit_code() is None for w in workers):
            time.sleep(0.02)
        self.killed.extend(w.name for w in workers if w.kill())

    def _close(self) -> None:
        everyone = [*self.workers, *self.spares.values()]
        self._stop(everyone)
        for w in everyone:
            w.close()
        if self.bar is not None:
            self.bar.close()
        self.relay.close(linger=0)
        self.status_sock.close(linger=0)
        if self.security is not None:
            self.security.close()
        if self.in_process:
            self.context.term()
