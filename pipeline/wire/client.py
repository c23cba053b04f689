"""The clients of a running pipeline, for Python programs: the mask feed's subscriber and
the prompt-control round trip (`send_prompt`).

    from pipeline.wire.client import MaskSubscriber

    with MaskSubscriber("tcp://127.0.0.1:5560", timeout_ms=5000) as sub:
        for frame in sub:  # MaskFrame per frame, until the stream ends
            for track, mask in zip(frame.tracks, frame.masks):  # (H, W) bool each
                ...
            for track, region in zip(frame.tracks, frame.regions):  # the compact form
                x1, y1, x2, y2 = region.box  # region.window: (y2 - y1, x2 - x1) bool

The feed is PUB/SUB: a subscriber that is too slow, or joins late, misses messages. Each
MaskFrame says how many sequence numbers were missed right before it (``gap``) and how old
it is (``latency_s``).

A feed with CURVE keys (``transport.curve``, README "Securing a tcp feed") needs the
subscriber's key pair, whose public half is in the feed's allowed clients, and the feed's
public key::

    MaskSubscriber(endpoint, client_key="robot.key_secret", server_key="server.key")

A refused subscriber receives nothing (ZeroMQ retries quietly); the TimeoutError, the log
and ``handshake_failures`` say why.

A prompt on a running tracker's control socket (the keys as above, for one with CURVE)::

    # control: the endpoint `samstream run` prints at start
    reply = send_prompt(control, PromptCommand(op="add", box=(10, 10, 80, 80)))
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from functools import cached_property

import msgspec
import numpy as np
import zmq

from pipeline.wire.curve import ClientSocket
from pipeline.wire.masks import RegionMask, stack_dense
from pipeline.wire.messages import (
    EndOfStream,
    FrameMeta,
    MaskMessage,
    Message,
    PromptCommand,
    PromptReply,
    StatusMessage,
    TrackRecord,
)
from pipeline.wire.stats import SequenceGaps
from pipeline.wire.transport import MessageReceiver, SocketOptions

log = logging.getLogger(__name__)

# Mask messages queued here before the publisher starts dropping for this subscriber.
# Small on purpose: HWMs count messages, and an old mask is worth little to a live consumer.
RCVHWM = 16
# Largest accepted message part: a 4K RGB frame is 25 MB; anything far beyond is not ours.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class MaskFrame(FrameMeta, frozen=True, kw_only=True, dict=True):
    """The masks of one frame, and the frame's FrameMeta: ``stream_id``, ``seq``,
    ``frame_index``, ``pts``, ``time_base``, ``capture_time`` (the wall clock when the frame
    was decoded), ``session`` (the source's connection number: it grows at every camera
    reconnect), ``source_pts``, and ``time_seconds`` (pts * time_base, None without pts).

    ``masks`` is N x H x W bool, mask i belonging to ``tracks[i]``; ``frame_size`` is
    (H, W). The feed carries each mask as the window of the frame that holds it:
    ``regions`` are those N RegionMask (``box`` (x1, y1, x2, y2), ``window`` bool inside
    it), and ``masks`` is built from them on first access (N frames of bools: a consumer
    that only needs the objects' pixels can stay with ``regions``). ``gap``: sequence
    numbers missed right before this frame (0 normally). ``latency_s``: receipt time minus
    capture time. ``timings``: milliseconds per stage ("decode", "encoder", "tracker",
    "publish") and "latency" (capture to publish), as the pipeline measured them.
    """

    frame_size: tuple[int, int]
    tracks: tuple[TrackRecord, ...]
    regions: tuple[RegionMask, ...]
    gap: int
    latency_s: float
    timings: dict[str, float]

    @cached_property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool, every track's mask over the whole frame (built once)."""
        return stack_dense(self.regions, self.frame_size)


class MaskSubscriber:
    """Subscribes to a mask feed and yields MaskFrame objects.

    Iterating yields a MaskFrame per mask message, keeps the latest StatusMessage in
    ``last_status`` (and each node's latest in ``statuses``), ends at an EndOfStream (kept
    in ``last_end``), and raises TimeoutError when ``timeout_ms`` passes without any
    message (None: wait forever). ``missed`` totals
    the sequence numbers missed; ``rejected`` counts malformed messages.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_ms: int | None = None,
        context: zmq.Context | None = None,
        client_key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
    ) -> None:
        """``client_key`` (this subscriber's ``.key_secret`` file) and ``server_key`` (the
        feed's public ``.key`` file), both or neither: CURVE keys for a feed that has them.
        A missing or malformed key file raises CurveKeyError (a ValueError) naming it."""
        self.timeout_ms = timeout_ms
        self.last_status: StatusMessage | None = None
        # The latest status of each node (the launcher relays them all to the publisher):
        # e.g. statuses["decoder"].state is "reconnecting" while the camera is away.
        self.statuses: dict[str, StatusMessage] = {}
        self.last_end: EndOfStream | None = None
        self.missed = 0
        self._gaps = SequenceGaps()
        # A SUB socket sends only its subscription, so sndhwm hardly matters.
        options = SocketOptions(sndhwm=1000, rcvhwm=RCVHWM, maxmsgsize=MAX_MESSAGE_BYTES)
        # Refused handshakes are watched, so that a wrong or missing key can be told.
        self._connection = ClientSocket(
            context or zmq.Context.instance(),
            zmq.SUB,
            endpoint,
            options,
            client_key=client_key,
            server_key=server_key,
            what=f"mask feed {endpoint}",
        )
        self._receiver = MessageReceiver(self._connection.socket)

    @property
    def handshake_failures(self) -> int:
        """Connection attempts the feed refused (a wrong or missing key): 0 when all is well."""
        return self._connection.poll()

    @property
    def rejected(self) -> int:
        """Malformed messages received and skipped."""
        return self._receiver.rejected

    def _to_frame(self, msg: MaskMessage, received: float) -> MaskFrame:
        meta = msg.meta
        skipped = self._gaps.see(meta.stream_id, meta.seq)
        gap = max(skipped, 0)
        if skipped > 0:
            self.missed += skipped
            log.warning(
                "stream %s: missed %d message(s) before seq %d", meta.stream_id, gap, meta.seq
            )
        elif skipped < 0:
            log.warning(
                "stream %s: seq went back to %d (publisher restarted?)", meta.stream_id, meta.seq
            )
        return MaskFrame(
            **msgspec.structs.asdict(meta),
            frame_size=msg.frame_size,
            tracks=msg.tracks,
            regions=msg.masks,
            gap=gap,
            latency_s=received - meta.capture_time,
            timings=dict(msg.timings),
        )

    def recv_event(self, timeout_ms: int | None) -> MaskFrame | Message | None:
        """The next message of any kind (MaskFrame, StatusMessage, EndOfStream), or None when
        none came within ``timeout_ms``; for consumers that follow the pipeline's health.
        ``last_status``, ``statuses``, ``last_end`` and the gap count are kept up to date."""
        msg = self._receiver.recv(timeout_ms)
        if isinstance(msg, MaskMessage):
            return self._to_frame(msg, time.time())
        if isinstance(msg, StatusMessage):
            self.last_status = msg
            self.statuses[msg.node] = msg
        elif isinstance(msg, EndOfStream):
            self.last_end = msg
            self._gaps.forget(msg.stream_id)  # a restarted stream counts from 0 again
        elif msg is not None:
            log.warning("ignored a '%s' message on a mask feed", msg.kind)
        return msg

    def recv(self, timeout_ms: int | None) -> MaskFrame | None:
        """The next MaskFrame, or None when none came within ``timeout_ms`` (None: wait
        forever).

        Unlike iteration, an EndOfStream does not stop it: it is recorded in ``last_end``
        and the wait goes on, so a long-running consumer outlives streams.
        """
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            remaining = None if deadline is None else max(0, deadline - time.monotonic())
            event = self.recv_event(None if remaining is None else int(remaining * 1000))
            if event is None or isinstance(event, MaskFrame):
                return event

    def __iter__(self) -> Iterator[MaskFrame]:
        while True:
            # Any message, status included, proves the publisher alive and restarts the wait.
            event = self.recv_event(self.timeout_ms)
            if event is None:
                raise TimeoutError(
                    f"no message from the mask feed in {self.timeout_ms} ms"
                    + self._connection.hint()
                )
            if isinstance(event, EndOfStream):
                return
            if isinstance(event, MaskFrame):
                yield event

    def close(self) -> None:
        """Close the socket at once, discarding anything queued."""
        self._connection.close()

    def __enter__(self) -> MaskSubscriber:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def send_prompt(
    endpoint: str,
    command: PromptCommand,
    *,
    timeout_s: float = 5.0,
    context: zmq.Context | None = None,
    client_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> PromptReply:
    """Send `command` and return the tracker's reply; TimeoutError when no tracker answers
    (saying so when the control socket refused this client's CURVE keys, or their absence).

    ``client_key`` (this client's ``.key_secret``) and ``server_key`` (the run's public
    ``.key``), both or neither, for a control socket with CURVE (``transport.curve``)."""
    timeout_ms = int(timeout_s * 1000)
    options = SocketOptions(sndhwm=1, rcvhwm=1, sndtimeo_ms=timeout_ms, rcvtimeo_ms=timeout_ms)
    connection = ClientSocket(
        context or zmq.Context.instance(),
        zmq.REQ,
        endpoint,
        options,
        client_key=client_key,
        server_key=server_key,
        what=f"control socket {endpoint}",
    )
    try:
        connection.socket.send(command.to_json())
        return PromptReply.from_json(connection.socket.recv())
    except zmq.Again as err:
        raise TimeoutError(
            f"no tracker answered on {endpoint} within {timeout_s:g} s{connection.hint()}"
        ) from err
    finally:
        connection.close()
