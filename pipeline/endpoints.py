"""What a ZeroMQ endpoint of samstream may be: ``tcp://host:port``, ``ipc://path`` or
``inproc://name``. One grammar for the config, which checks every endpoint where it enters,
and the transport, which checks it again where a socket opens (an endpoint may come from
code, not only from a config); no import of zmq or of the rest of the package.
"""

from __future__ import annotations

ENDPOINT_RULE = "tcp://host:port (port 1-65535), ipc://path or inproc://name"


def tcp_host_port(endpoint: str) -> tuple[str, str]:
    """``(host, port)`` of ``tcp://host:port`` (the host may be ``*`` or ``[v6]``); ValueError
    for anything else."""
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"bad tcp endpoint {endpoint!r}: expected tcp://host:port with port 1-65535"
        )
    return host, port


def validate_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it is ``ipc://path``, ``inproc://name`` or
    ``tcp://host:port``; raise ValueError naming it otherwise.

    A host other hosts can reach (``*``, ``0.0.0.0``, a LAN address) is accepted: whether
    that is safe depends on CURVE keys this function does not see, so the launcher (or a
    node started by hand) warns once per such endpoint (`pipeline.wire.curve.exposure_warnings`)
    rather than every socket that opens it.
    """
    if endpoint.startswith("tcp://"):
        tcp_host_port(endpoint)
        return endpoint
    for scheme in ("ipc://", "inproc://"):
        if endpoint.startswith(scheme) and len(endpoint) > len(scheme):
            return endpoint
    raise ValueError(
        f"bad endpoint {endpoint!r}: expected ipc://path, inproc://name or tcp://host:port"
    )
