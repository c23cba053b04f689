"""ZeroMQ sockets and message framing for the pipeline's nodes.

Delivery semantics, by socket pair (ZeroMQ's, not ours):

- PUSH/PULL is lossless: a PUSH socket whose peers' queues are full (high-water mark)
  blocks in send, so a slow consumer back-pressures the producer. Offline jobs use it.
- PUB/SUB drops: at a subscriber's high-water mark PUB silently discards that
  subscriber's messages and never blocks. Subscribers that join late miss the first
  messages. Consumers see loss as gaps in ``FrameMeta.seq``.

Live mode's "newest frame wins" is done by the receiving node (`pipeline.run.runtime`), not by
ZeroMQ's CONFLATE: CONFLATE keeps one part of a multipart message, and it discards a queued
message when the sender disconnects (measured with pyzmq 27 over ipc and tcp), which would
lose the end-of-stream marker of a sender that has just finished.

High-water marks count messages, not bytes (1000 queued 2 MB mask messages are 2 GB), so
``SocketOptions`` has no default for them: each socket states its own. Every option is set
before bind/connect because ZeroMQ applies most of them only to connections made afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Protocol

import zmq

from pipeline.endpoints import tcp_host_port, validate_endpoint
from pipeline.wire.messages import Message, MessageError, decode, encode

log = logging.getLogger(__name__)


class SocketSecurity(Protocol):
    """What a socket sets before it binds or connects to authenticate and encrypt its
    connections: `pipeline.wire.curve`'s CurveServer, CurveClient or ClientSocket."""

    def apply(self, sock: zmq.Socket) -> None: ...


@dataclass(frozen=True, kw_only=True)
class SocketOptions:
    """Options set on every socket before it binds or connects.

    ``linger_ms`` 0 drops unsent messages on close (ZeroMQ's default, infinite, can hang a
    shutting-down process forever). ``sndhwm`` / ``rcvhwm``: queue limits in messages.
    ``maxmsgsize``: largest accepted inbound message part in bytes (-1: no limit), for
    sockets that face the network. ``sndtimeo_ms`` / ``rcvtimeo_ms``: -1 blocks forever.
    """

    linger_ms: int = 0
    sndhwm: int
    rcvhwm: int
    maxmsgsize: int = -1
    sndtimeo_ms: int = -1
    rcvtimeo_ms: int = -1


# The status link, both ends: a status must never block a node, so a slow or gone launcher
# makes the nodes drop statuses (1000 queued), not wait.
STATUS_LINK_OPTIONS = SocketOptions(sndhwm=1000, rcvhwm=1000)


def _prepare_ipc_path(path: str) -> None:
    """Create the parent folder and remove a socket file left by a dead process.

    A socket file someone still listens on is not removed: ZeroMQ would unlink it and
    silently take the address from the running node.
    """
    if path.startswith("@"):  # Linux abstract namespace: no file
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"ipc://{path}: the path exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"ipc://{path} is in use by a running process")


def open_socket(
    ctx: zmq.Context,
    socket_type: int,
    endpoint: str,
    *,
    bind: bool,
    options: SocketOptions,
    subscribe: bytes | None = None,
    security: SocketSecurity | None = None,
) -> zmq.Socket:
    """A socket of ``socket_type`` with ``options`` set, bound or connected to ``endpoint``.

    ``subscribe`` is the topic prefix of a SUB socket (None: everything, b""); other socket
    types take none. ``security`` (CURVE keys, `pipeline.wire.curve`) is applied before the
    bind or connect, because ZeroMQ uses a mechanism only for connections made afterwards;
    None leaves the socket as ZeroMQ makes it (NULL: no authentication, no encryption).
    """
    validate_endpoint(endpoint)
    if socket_type != zmq.SUB and subscribe is not None:
        raise ValueError("subscribe is only for SUB sockets")
    if not bind and endpoint.startswith("tcp://") and tcp_host_port(endpoint)[0] == "*":
        raise ValueError(f"cannot connect to {endpoint!r}: '*' is only for binding")
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.LINGER, options.linger_ms)
        sock.setsockopt(zmq.SNDHWM, options.sndhwm)
        sock.setsockopt(zmq.RCVHWM, options.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, options.maxmsgsize)
        sock.setsockopt(zmq.SNDTIMEO, options.sndtimeo_ms)
        sock.setsockopt(zmq.RCVTIMEO, options.rcvtimeo_ms)
        if socket_type == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"" if subscribe is None else subscribe)
        if security is not None:
            security.apply(sock)
        if bind:
            if endpoint.startswith("ipc://"):
                _prepare_ipc_path(endpoint[len("ipc://") :])
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


AUTO_PUBLISH_HOST = "127.0.0.1"
AUTO_PUBLISH_PORTS = range(5555, 5605)  # "auto": the first free one


def bind_auto(
    ctx: zmq.Context,
    socket_type: int,
    *,
    options: SocketOptions,
    security: SocketSecurity | None = None,
) -> tuple[zmq.Socket, str]:
    """A socket bound to the first free tcp://127.0.0.1 port of AUTO_PUBLISH_PORTS, and its
    endpoint. Binding is the only race-free test of a free port: two runs started together
    both see a probe succeed, and then one of them fails to bind."""
    for port in AUTO_PUBLISH_PORTS:
        endpoint = f"tcp://{AUTO_PUBLISH_HOST}:{port}"
        try:
            sock = open_socket(
                ctx, socket_type, endpoint, bind=True, options=options, security=security
            )
            return sock, endpoint
        except zmq.ZMQError as err:
            if err.errno != errno.EADDRINUSE:
                raise
    first, last = AUTO_PUBLISH_PORTS[0], AUTO_PUBLISH_PORTS[-1]
    raise OSError(
        errno.EADDRINUSE,
        f"ports {first}..{last} of {AUTO_PUBLISH_HOST} are all in "
        "use: set transport.publish to a free endpoint",
    )


def send_message(sock: zmq.Socket, msg: Message, *, flags: int = 0) -> None:
    """Send ``msg`` without copying its arrays (they must stay unchanged until sent)."""
    sock.send_multipart(encode(msg), copy=False, flags=flags)


class MessageReceiver:
    """Receives and decodes messages from one socket, surviving malformed ones.

    A malformed message is logged, counted in ``rejected`` and skipped, so one bad peer
    cannot stop a node.
    """

    def __init__(self, sock: zmq.Socket) -> None:
        self.socket = sock
        self.rejected = 0

    def recv(self, timeout_ms: int | None) -> Message | None:
        """The next well-formed message, or None after ``timeout_ms`` (None: wait forever)."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.socket.poll(None if remaining is None else remaining * 1000):
                return None
            # Drain what is queued; if it was all malformed, wait again for the rest of the time.
            while True:
                try:
                    frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    return decode(frames)
                except MessageError as exc:
                    self.rejected += 1
                    log.warning("rejected a malformed message (%d so far): %s", self.rejected, exc)
