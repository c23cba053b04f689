"""The prompt-control client: one REQ round trip to a running tracker's control socket."""

from __future__ import annotations

import zmq

from pipeline.messages import PromptCommand, PromptReply
from pipeline.transport import SocketOptions, open_socket


def send_prompt(
    endpoint: str,
    command: PromptCommand,
    *,
    timeout_s: float = 5.0,
    context: zmq.Context | None = None,
) -> PromptReply:
    """Send `command` and return the tracker's reply; TimeoutError when no tracker answers."""
    ctx = context or zmq.Context.instance()
    timeout_ms = int(timeout_s * 1000)
    options = SocketOptions(
        linger_ms=0, sndhwm=1, rcvhwm=1, sndtimeo_ms=timeout_ms, rcvtimeo_ms=timeout_ms
    )
    sock = open_socket(ctx, zmq.REQ, endpoint, bind=False, options=options)
    try:
        sock.send(command.to_json())
        return PromptReply.from_json(sock.recv())
    except zmq.Again as err:
        raise TimeoutError(f"no tracker answered on {endpoint} within {timeout_s:g} s") from err
    finally:
        sock.close(linger=0)
