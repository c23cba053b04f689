"""The node runtime: sockets, the loop, status heartbeats and clean shutdown, for every node.

A node is a class with declared ports and per-message methods that never touch a socket:

- a *source* (the decoder) implements `produce()`, yielding messages;
- every other node implements `process(msg) -> list[Message]` (or `process_batch` when it
  gains from several waiting messages), `finish(end) -> list[Message]` at end of stream,
  and, if it takes prompt commands, `handle_command(cmd) -> PromptReply`: the control
  socket's own thread calls it as each command comes, also while `process` works on a
  frame, so it must touch only what is made to be shared (the tracker's command queue).

`NodeRunner` owns the rest. Between nodes, PUSH -> PULL in one of two modes:

- lossless (offline): a full queue blocks the sender, nothing is dropped, and a node takes
  up to ``max_batch`` waiting messages at once;
- live: a thread of the receiving node drains its input as fast as messages come and keeps
  only the newest frame (`NewestInbox`), so a slow node always works on the newest frame,
  nothing queues up in between, and a send never blocks. Replaced frames are counted
  (``dropped_newest_wins``); they also show as gaps in the sequence numbers a node
  receives (``input_gaps``). The end-of-stream marker and status messages are never
  dropped.

Each node binds its input and connects its output, so nodes can start in any order. Every
node PUSHes status messages to the launcher's status endpoint; a status message that
arrives on a node's *input* (the launcher relays every node's status to the publisher) goes
out on that node's PUB socket, so consumers see the health of the whole pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from pipeline.run.inbox import POLL_MS, NewestInbox
from pipeline.wire.curve import CurveClient, CurveSecurity, CurveServer
from pipeline.wire.messages import (
    EmbeddingMessage,
    EndOfStream,
    FrameMessage,
    MaskMessage,
    Message,
    MessageError,
    PromptCommand,
    PromptReply,
    StatusMessage,
    encode,
)
from pipeline.wire.stats import WINDOW, SequenceGaps, percentiles
from pipeline.wire.transport import (
    STATUS_LINK_OPTIONS,
    MessageReceiver,
    SocketOptions,
    bind_auto,
    open_socket,
    send_message,
)

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.run.handoff import NodeRuntime

log = logging.getLogger(__name__)

LIVE_WAIT_S = 0.02  # live loop's wait for a frame
# After a clean end every queued output message must reach the next node, however late that
# node started (a decoder can finish a short clip before the encoder has imported torch):
# linger forever. A node that never comes is the launcher's business: it stops the run.
FLUSH_LINGER_MS = -1


# The key of a status message's detail that carries the run's token to the launcher.
STATUS_TOKEN_KEY = "run_token"


class Shutdown(Exception):
    """Raised inside a node's process by SIGTERM/SIGINT: stop now, even mid-computation."""


class Node:
    """Base class. Subclasses set `name`, declare their ports, and implement `produce`
    (sources: no ``inputs``) or `process` (the rest). Heavy set-up (models) goes in `setup`,
    which runs in the node's own process, never at import or construction.

    Ports: ``inputs`` are the message kinds the node takes (the runtime rejects and counts
    any other kind before `process` sees it: ``counters["wrong_kind_messages"]``);
    ``outputs`` those it sends. End markers and relayed statuses are the runtime's and are
    never in either. `from_config` builds the node a run configures (`pipeline.run.graph`)."""

    name: ClassVar[str] = "node"
    inputs: ClassVar[tuple[type[Message], ...]] = ()
    outputs: ClassVar[tuple[type[Message], ...]] = ()
    # Modules `setup` imports (a model's, a backend's): a live run's spare process of the
    # node imports them ahead, so that a restart only loads the model. One that is not
    # installed (an optional backend) is passed over.
    preload: ClassVar[tuple[str, ...]] = ()
    max_batch: int = 1

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.detail: dict[str, Any] = {}
        # Recent per-message times for the median/p95 in status and summary; bounded, since a
        # live run can last for weeks.
        self.durations_ms: deque[float] = deque(maxlen=WINDOW)
        # What the heartbeat says ("running" unless the node knows better, e.g. a decoder
        # whose camera is "reconnecting"); `notify` sends it at once instead of next beat.
        self.state = "running"
        self.status_due = False

    @classmethod
    def from_config(cls, config: RunConfig, runtime: NodeRuntime) -> Node:
        """The node as a run configures it; ``config`` is resolved (`pipeline.run.live`),
        ``runtime`` what the launcher handed it (`pipeline.run.handoff`)."""
        raise NotImplementedError(f"{cls.__name__} is not built from a run config")

    @property
    def is_source(self) -> bool:
        return not self.inputs

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def notify(self) -> None:
        """Ask the runtime to send a status message now (a state change worth telling)."""
        self.status_due = True

    def before_status(self) -> None:
        """Called before each status message: refresh ``state`` and ``detail``."""

    def setup(self) -> None:
        """Load models, open files: runs once in the node's process before the loop."""

    def produce(self) -> Iterator[Message | None]:
        """Messages to send; None is an idle tick (waiting for a camera, pacing a file) that
        lets the runtime heartbeat and notice a stop."""
        raise NotImplementedError(f"{self.name} is not a source")

    def process(self, msg: Message) -> list[Message]:
        raise NotImplementedError(f"{self.name} does not process messages")

    def process_batch(self, msgs: list[Message]) -> list[Message]:
        return [out for msg in msgs for out in self.process(msg)]

    def finish(self, end: EndOfStream) -> list[Message]:
        """End of stream: flush and pass the end marker on."""
        return [end]

    def abort(self) -> None:
        """Stopped or failed: drop partial work (no half-written outputs)."""

    def stopped(self) -> None:
        """Stopped by a signal or a stop request: by default the same as `abort`. A node
        whose work is complete at any frame (a live run's outputs) may keep it instead."""
        self.abort()

    def handle_command(self, command: PromptCommand) -> PromptReply:
        """One prompt command, in the control socket's thread (see the module docs)."""
        return PromptReply(ok=False, error=f"{self.name} takes no commands")

    def stats(self) -> dict[str, Any]:
        """Per-message milliseconds: count, median, p95."""
        figures = percentiles(self.durations_ms)
        if figures is None:
            return {"messages": 0}
        return {
            "messages": len(self.durations_ms),
            "ms_median": figures["median"],
            "ms_p95": figures["p95"],
        }


@dataclass(frozen=True)
class NodeEndpoints:
    """Where one node's sockets go. input: bound PULL; output: connected PUSH; publish: bound
    PUB for consumers (drops at its high-water mark, never blocks; status goes there too);
    status: connected PUSH to the launcher; control: bound REP for prompt commands."""

    input: str | None = None
    output: str | None = None
    publish: str | None = None
    status: str | None = None
    control: str | None = None


@dataclass
class _Sockets:
    input: MessageReceiver | None = None
    output: zmq.Socket | None = None
    publish: zmq.Socket | None = None
    status: zmq.Socket | None = None
    control: zmq.Socket | None = None
    publish_endpoint: str | None = None  # where `publish` is bound ("auto" made concrete)
    all: list[zmq.Socket] = field(default_factory=list)


def _open(
    ctx: zmq.Context,
    endpoints: NodeEndpoints,
    hwm: int,
    max_message_bytes: int,
    security: CurveSecurity | None = None,
) -> _Sockets:
    opts = SocketOptions(linger_ms=0, sndhwm=hwm, rcvhwm=hwm, maxmsgsize=max_message_bytes)
    s = _Sockets()

    # The CURVE role of each socket (None: NULL, as without keys): pipeline.wire.curve. A bound
    # socket serves (``link``: an internal link's receiving end), a connected one is a client.
    def role(endpoint: str, bind: bool, link: bool) -> CurveServer | CurveClient | None:
        if security is None:
            return None
        return security.server(endpoint, link=link) if bind else security.client(endpoint)

    def add(
        kind: int, endpoint: str, options: SocketOptions, *, bind: bool, link: bool = False
    ) -> zmq.Socket:
        sock = open_socket(
            ctx, kind, endpoint, bind=bind, options=options, security=role(endpoint, bind, link)
        )
        s.all.append(sock)
        return sock

    if endpoints.input:
        s.input = MessageReceiver(add(zmq.PULL, endpoints.input, opts, bind=True, link=True))
    if endpoints.output:
        s.output = add(zmq.PUSH, endpoints.output, opts, bind=False)
    if endpoints.publish:
        # Bounded memory per subscriber: a slow consumer loses messages (it sees the gap in
        # sequence numbers), it never slows the pipeline or grows the publisher.
        pub_opts = SocketOptions(linger_ms=0, sndhwm=max(hwm, 64), rcvhwm=1)
        if endpoints.publish == "auto":
            s.publish, s.publish_endpoint = bind_auto(
                ctx, zmq.PUB, options=pub_opts, security=role("tcp://auto", True, False)
            )
            s.all.append(s.publish)
        else:
            s.publish = add(zmq.PUB, endpoints.publish, pub_opts, bind=True)
            s.publish_endpoint = endpoints.publish
    if endpoints.status:
        s.status = add(zmq.PUSH, endpoints.status, STATUS_LINK_OPTIONS, bind=False)
    if endpoints.control:
        control_opts = SocketOptions(linger_ms=0, sndhwm=100, rcvhwm=100, maxmsgsize=1 << 20)
        s.control = add(zmq.REP, endpoints.control, control_opts, bind=True)
    return s


def _send_nowait(sock: zmq.Socket | None, msg: Message) -> bool:
    """Send unless the queue is full (False then); no socket: nothing to do (True)."""
    if sock is not None:
        try:
            send_message(sock, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
    return True


class NodeRunner:
    """Runs one node until its stream ends, it fails, or `stop` is set."""

    def __init__(
        self,
        node: Node,
        endpoints: NodeEndpoints,
        *,
        context: zmq.Context | None = None,
        hwm: int = 8,
        max_message_bytes: int = -1,
        status_interval_s: float = 1.0,
        stop: threading.Event | None = None,
        live: bool = False,
        status_token: str | None = None,
        security: CurveSecurity | None = None,
    ) -> None:
        """``live``: conflating links (newest message wins, never block) instead of lossless
        ones; every node of a pipeline must agree. ``status_token``: the secret the
        launcher handed out for this run, put in every status sent to it. ``security``: the
        CURVE keys of the node's sockets (None: none); its refusals go in the status."""
        self.status_token = status_token
        self.security = security
        self.node = node
        self.live = live
        self._gaps = SequenceGaps()
        self.endpoints = endpoints
        self.context = context or zmq.Context.instance()
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self.status_interval_s = status_interval_s
        self.stop = stop or threading.Event()
        self._last_status = 0.0
        self._sockets = _Sockets()
        self._output_monitor: zmq.Socket | None = None

    # -- status ---------------------------------------------------------------------------
    def send_status(self, state: str | None = None, **detail: Any) -> None:
        """Send a status message: ``state`` (None: the node's own ``state``) and detail."""
        if self._sockets.status is None and self._sockets.publish is None:
            return
        self.node.before_status()
        if self.security is not None and self.security.serving:
            self.node.detail.update(self.security.status())  # refused_connections
        self.node.detail.update(detail)
        self.node.status_due = False
        msg = StatusMessage(
            node=self.node.name,
            state=state or self.node.state,
            time=time.time(),
            counters=dict(self.node.counters),
            detail={**self.node.detail, "stats": self.node.stats()},
        )
        # The launcher's copy carries the run's token (it believes no status without it);
        # the feed's never does: subscribers must not learn it.
        signed = msg
        if self.status_token is not None:
            signed = msgspec.structs.replace(
                msg, detail={**msg.detail, STATUS_TOKEN_KEY: self.status_token}
            )
        # A slow reader misses it: the next heartbeat carries the same figures.
        _send_nowait(self._sockets.status, signed)
        _send_nowait(self._sockets.publish, msg)
        self._last_status = time.monotonic()

    def _heartbeat(self) -> None:
        due = time.monotonic() - self._last_status >= self.status_interval_s
        if due or self.node.status_due:
            self.send_status()

    # -- sending with back-pressure that still notices a stop -----------------------------
    def _publish(self, msg: Message) -> None:
        """Out on the PUB socket, if this node has one; PUB drops rather than blocks."""
        if not _send_nowait(self._sockets.publish, msg):
            self.node.count("publish_dropped")

    def _send(self, msg: Message) -> None:
        self._publish(msg)
        out = self._sockets.output
        if out is None:
            return
        if self.live and not isinstance(msg, EndOfStream):
            # The next node drains its input continuously, so this rarely finds the queue
            # full (the node is still starting, or gone): then the frame is dropped, not
            # waited for. The end of the stream always waits for room.
            if not _send_nowait(out, msg):
                self.node.count("output_dropped")
            return
        frames = encode(msg)
        while True:
            if self.stop.is_set():
                raise Shutdown
            try:
                out.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                # Lossless: the next node is busy; wait for room, heartbeating meanwhile.
                out.poll(POLL_MS, zmq.POLLOUT)
                self._heartbeat()

    def _of_input_kinds(self, batch: list[Message]) -> list[Message]:
        """The messages of a kind the node takes; the others counted and dropped (a node
        linked to the wrong endpoint, or a peer sending what it should not)."""
        kept = [msg for msg in batch if isinstance(msg, self.node.inputs)]
        for msg in batch:
            if not isinstance(msg, self.node.inputs):
                self.node.count("wrong_kind_messages")
                if self.node.counters["wrong_kind_messages"] == 1:
                    log.warning(
                        "%s: dropped a %s message: it takes %s",
                        self.node.name,
                        type(msg).__name__,
                        ", ".join(kind.__name__ for kind in self.node.inputs),
                    )
        return kept

    def _timed_batch(self, batch: list[Message]) -> list[Message]:
        batch = self._of_input_kinds(batch)
        if not batch:
            return []
        start = time.perf_counter()
        result = self.node.process_batch(batch)
        # Per message, so a batch of 4 counts as 4 messages at a quarter of the time each.
        per_message = (time.perf_counter() - start) * 1000 / len(batch)
        self.node.durations_ms.extend([per_message] * len(batch))
        return result

    # -- the loops ------------------------------------------------------------------------
    def _run_source(self) -> None:
        for msg in self.node.produce():
            if msg is not None:
                self._send(msg)
            self._heartbeat()
            if self.stop.is_set():
                raise Shutdown

    def _serve_commands(self, ctl: zmq.Socket, done: threading.Event) -> None:
        """The control socket's thread: answers each prompt command as it comes (through
        `Node.handle_command`), also while the node's thread is in the middle of a frame."""
        while not done.is_set():
            if not ctl.poll(POLL_MS):
                continue
            # All parts, so that a multipart request cannot leave the REP socket expecting a
            # reply to a message it has not finished reading (the node died of that).
            parts = ctl.recv_multipart()
            try:
                if len(parts) != 1:
                    raise MessageError(f"a prompt command is one message part, got {len(parts)}")
                reply = self.node.handle_command(PromptCommand.from_json(parts[0]))
            except MessageError as err:
                self.node.count("bad_commands")
                reply = PromptReply(ok=False, error=str(err))
            except Exception as err:  # a bug: answered (REP must reply), the thread goes on
                log.exception("%s: a prompt command failed", self.node.name)
                reply = PromptReply(ok=False, error=f"{type(err).__name__}: {err}")
            ctl.send(reply.to_json())

    @contextlib.contextmanager
    def _commands_served(self) -> Iterator[None]:
        """The control socket served by its own thread for the duration of the block."""
        ctl = self._sockets.control
        if ctl is None:
            yield
            return
        done = threading.Event()
        thread = threading.Thread(
            target=self._serve_commands, args=(ctl, done), name="samstream-control", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()  # within POLL_MS and one command: the socket is the runner's again

    def _take_waiting(self) -> tuple[list[Message], EndOfStream | None, list[StatusMessage]]:
        """Lossless input: up to ``max_batch`` waiting data messages (waiting POLL_MS for the
        first), the end marker if it came, and the statuses among them."""
        receiver = self._sockets.input
        batch: list[Message] = []
        statuses: list[StatusMessage] = []
        msg = receiver.recv(POLL_MS)
        while msg is not None:
            if isinstance(msg, EndOfStream):
                return batch, msg, statuses
            if isinstance(msg, StatusMessage):
                statuses.append(msg)
            else:
                batch.append(msg)
                if len(batch) == self.node.max_batch:
                    break
            msg = receiver.recv(0)
        return batch, None, statuses

    def _run_consumer(self, inbox: NewestInbox | None) -> None:
        """Process what comes until the end of the stream: the newest frame when the node is
        free (live, ``inbox``), else every message in order, in batches of what is waiting."""
        receiver = self._sockets.input
        while not self.stop.is_set():
            if inbox is None:
                batch, end, statuses = self._take_waiting()
            else:
                newest, end, statuses = inbox.take(LIVE_WAIT_S)
                batch = [] if newest is None else [newest]
                self.node.counters["dropped_newest_wins"] = inbox.dropped
            for status in statuses:
                self._publish(status)  # another node's, relayed by the launcher
            self.node.counters["rejected_messages"] = receiver.rejected
            for msg in batch:
                self._count_gap(msg)
            if batch:
                for out in self._timed_batch(batch):
                    self._send(out)
            if end is not None:
                for out in self.node.finish(end):
                    self._send(out)
                return
            self._heartbeat()
        raise Shutdown

    def _count_gap(self, msg: Message) -> None:
        """Count sequence numbers skipped before ``msg`` (frames dropped upstream)."""
        if not isinstance(msg, FrameMessage | EmbeddingMessage | MaskMessage):
            return
        skipped = self._gaps.see(msg.meta.stream_id, msg.meta.seq)
        if skipped > 0:
            self.node.count("input_gaps", skipped)
        self.node.count("frames_in")

    def _hold_until_read(self) -> None:
        """After the end of the stream, keep the connection to the next node open until that
        node has closed its end (it has read everything, end marker included), or a stop.

        ZeroMQ loses the last messages of a connection whose sender goes away while the
        receiver's queue is full: the receiving engine drops what it has read but not yet
        queued (seen over ipc: a 10-frame clip sent to an encoder still loading its model
        arrived as 8 frames and no end marker, and the run waited forever). Only the
        receiver can tell when it is done, and it does so by closing its socket.
        """
        monitor = self._output_monitor
        if monitor is None:
            return
        for sock in (self._sockets.input, self._sockets.control):
            if sock is not None:  # nothing more comes in: let the previous node go
                raw = sock.socket if isinstance(sock, MessageReceiver) else sock
                raw.close(linger=0)
        try:
            while not self.stop.is_set():
                if not monitor.poll(POLL_MS):
                    continue
                event = recv_monitor_message(monitor)
                if event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_MONITOR_STOPPED):
                    return
        except Shutdown:
            return  # stopped while waiting: the stream was complete all the same

    def run(self) -> int:
        """0 after a complete stream; 1 after a failure (reported in a status message)."""
        clean = False
        try:
            self._sockets = _open(
                self.context, self.endpoints, self.hwm, self.max_message_bytes, self.security
            )
            if self._sockets.publish_endpoint is not None:
                self.node.detail["publish"] = self._sockets.publish_endpoint
            output = self._sockets.output
            if output is not None and not (self.endpoints.output or "").startswith("inproc://"):
                # Watched from the start, so that a disconnection is never missed (inproc
                # has no connection to lose, and reports none).
                self._output_monitor = output.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.send_status("starting")
            # Live: drain the input already while the model loads, so the first frame
            # processed is the newest, not the oldest of those queued meanwhile.
            inbox = None
            if self.live and not self.node.is_source:
                inbox = NewestInbox(self._sockets.input)
            try:
                self.node.setup()
                self.send_status()
                with self._commands_served():
                    if self.node.is_source:
                        self._run_source()
                    else:
                        self._run_consumer(inbox)
            finally:
                if inbox is not None:
                    inbox.close()
            clean = True
            self.send_status("done")
            self._hold_until_read()
            return 0
        except Shutdown:
            log.info("%s: stopping", self.node.name)
            self.node.stopped()
            self.send_status("stopped")
            return 0
        except Exception as err:
            log.exception("%s failed", self.node.name)
            self.node.abort()
            self.send_status("failed", error=f"{type(err).__name__}: {err}")
            return 1
        finally:
            if self._output_monitor is not None:
                self._sockets.output.disable_monitor()
                self._output_monitor.close(linger=0)
                self._output_monitor = None
            for sock in self._sockets.all:
                # After a clean end the queued output must reach the next node; otherwise go.
                linger = FLUSH_LINGER_MS if clean and sock is self._sockets.output else 0
                if sock is self._sockets.status or sock is self._sockets.publish:
                    linger = 1000 if clean else 200
                sock.close(linger=linger)
            if self.security is not None:
                self.security.close()  # its ZAP handler, before the context terminates


_deferring = 0  # depth of `shutdown_deferred` blocks in the main thread
_deferred_signal: str | None = None


@contextlib.contextmanager
def shutdown_deferred() -> Iterator[None]:
    """A block that a signal must not cut in half (one frame's files: its JSON line, PNG
    and overlay frame, all or none): SIGTERM/SIGINT inside it raise Shutdown right after."""
    global _deferring, _deferred_signal
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _deferring == 0 and _deferred_signal is not None:
        name, _deferred_signal = _deferred_signal, None
        raise Shutdown(name)


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT raise Shutdown in the main thread: a node stops within milliseconds,
    even in the middle of an encode, instead of finishing a multi-second computation."""

    def _handler(signum: int, frame: Any) -> None:
        global _deferred_signal
        # Once is enough: a second signal must not interrupt the clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _deferring:
            _deferred_signal = signal.Signals(signum).name
            return
        raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
