"""The prompt-control client: one REQ round trip to a running tracker's control socket."""

from __future__ import annotations

import os

import zmq

from pipeline.wire.curve import connect_client
from pipeline.wire.messages import PromptCommand, PromptReply
from pipeline.wire.transport import SocketOptions


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
    sock, handshakes = connect_client(
        context or zmq.Context.instance(),
        zmq.REQ,
        endpoint,
        options,
        client_key=client_key,
        server_key=server_key,
        what=f"control socket {endpoint}",
    )
    try:
        sock.send(command.to_json())
        return PromptReply.from_json(sock.recv())
    except zmq.Again as err:
        raise TimeoutError(
            f"no tracker answered on {endpoint} within {timeout_s:g} s{handshakes.hint()}"
        ) from err
    finally:
        handshakes.close()
        sock.close(linger=0)
