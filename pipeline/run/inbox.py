"""A live node's input: the newest frame wins (`NewestInbox`)."""

from __future__ import annotations

import threading
from collections import deque

from pipeline.wire.messages import EndOfStream, Message, StatusMessage
from pipeline.wire.transport import MessageReceiver

POLL_MS = 100  # how often a blocked loop looks at the stop flag
MAX_QUEUED_STATUSES = 1000  # a live node takes them every few ms; this bounds a flood only


class NewestInbox:
    """Live input: a thread drains the input socket as fast as messages arrive and keeps
    only the newest data message, dropping (and counting) the one it replaces; status
    messages are all kept, in order (up to MAX_QUEUED_STATUSES between two takes).

    ZeroMQ's own CONFLATE would do the dropping, but it cannot hold multipart messages and
    it discards a queued message when its sender disconnects: the end-of-stream marker of a
    node that has just finished would be lost. Here the end marker is never dropped, nor
    a status message (a "stalled" followed at once by "reconnecting" was lost when only the
    latest status of each node was kept). The thread owns the socket until `close`, so nothing
    else may use it.
    """

    def __init__(self, receiver: MessageReceiver) -> None:
        self._receiver = receiver
        self._cond = threading.Condition()
        self._newest: Message | None = None
        self._end: EndOfStream | None = None
        # Every status, in order: a state that lasts a moment ("stalled", at once followed
        # by "reconnecting") must still reach the consumers. Bounded only against a flood.
        self._statuses: deque[StatusMessage] = deque(maxlen=MAX_QUEUED_STATUSES)
        self._closing = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="samstream-inbox", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closing.is_set() and self._end is None:
            msg = self._receiver.recv(POLL_MS)
            if msg is None:
                continue
            with self._cond:
                if isinstance(msg, EndOfStream):
                    self._end = msg
                elif isinstance(msg, StatusMessage):
                    self._statuses.append(msg)
                else:
                    if self._newest is not None:
                        self.dropped += 1
                    self._newest = msg
                self._cond.notify()

    def take(
        self, timeout_s: float
    ) -> tuple[Message | None, EndOfStream | None, list[StatusMessage]]:
        """(newest data message, end marker, statuses), waiting up to ``timeout_s`` for any.

        The end marker comes only once no frame is left before it."""
        with self._cond:
            if self._newest is None and self._end is None and not self._statuses:
                self._cond.wait(timeout_s)
            newest, self._newest = self._newest, None
            end = self._end if newest is None else None
            statuses = list(self._statuses)
            self._statuses.clear()
        return newest, end, statuses

    def close(self) -> None:
        """Stop the thread (within POLL_MS); the socket is the caller's again."""
        self._closing.set()
        self._thread.join()
