"""Checks made before any node starts, so that a run that cannot work fails in seconds with
a message a user can act on, not minutes later from deep inside a node.

`check_source` checks the source (a file exists and decodes: its first frame gives the
size the prompts are checked against; a camera opens) and the prompts on it (each must lie
on the first frame, with the error `predict` gives); `preflight` the weights (found, and a
checkpoint), the devices, that an offline run has a prompt, every tcp endpoint the run
binds (a port nobody has) and the CURVE key files (`pipeline.wire.curve`). It returns the
config with the weights' and the key files' paths made concrete.
"""

from __future__ import annotations

import msgspec
import zmq

from pipeline.config import DecoderConfig, PromptConfig, RunConfig
from pipeline.prompts import check_box, check_points
from pipeline.run.graph import GRAPH
from pipeline.video.live_source import Backoff, LiveSource, spec_for
from pipeline.video.sources import SourceError, VideoSource, check_device
from pipeline.wire.curve import check_key_files


class PreflightError(ValueError):
    """A run that cannot work; the message says what to change."""


def first_frame_size(decoder: DecoderConfig) -> tuple[int, int] | None:
    """(height, width) of the source's first frame; None for a camera, which is only
    opened (a wrong URL or a camera that is not there fails here, before any node starts;
    its frames are the decoder's). Raises SourceError when it cannot open or decode."""
    spec = spec_for(decoder)
    if spec.kind == "webcam":
        check_device(spec.url)
        return None
    if spec.is_live:
        camera = LiveSource(
            spec,
            open_timeout_s=decoder.open_timeout_s,
            read_timeout_s=decoder.read_timeout_s,
            backoff=Backoff(decoder.reconnect_initial_s, decoder.reconnect_max_s),
        )
        try:
            camera.open()
        finally:
            camera.close()
        return None
    with VideoSource(spec, max_frames=1, open_timeout_s=decoder.open_timeout_s) as video:
        for frame in video:
            return frame.image.shape[:2]
    raise SourceError(f"video source {spec.display_name!r} has no decodable frame")


def check_weights(weights: str) -> str:
    """The checkpoint's path, after checking that it is one (found, and plain tensors)."""
    from pipeline.model.checkpoint import read_state_dict
    from pipeline.model.weights import resolve_weights

    path = resolve_weights(weights)
    read_state_dict(path)  # raises CheckpointError naming the file and the problem
    return str(path.resolve())


def check_devices(config: RunConfig) -> None:
    """A CUDA device asked for where there is none (or not that many)."""
    wanted = {f"encoder.device={config.encoder.device}", f"tracker.device={config.tracker.device}"}
    cuda = [d for d in (config.encoder.device, config.tracker.device) if d.startswith("cuda")]
    if not cuda:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in cuda:
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA GPU (or no CUDA build of torch)"
            raise PreflightError(
                f"{device} was asked for ({', '.join(sorted(wanted))}) but this machine has "
                f"{have}: use --device cpu or --device auto"
            )


def check_prompts(prompts: tuple[PromptConfig, ...], frame_size: tuple[int, int]) -> None:
    """Each prompt on the first frame it applies to, with `predict`'s errors."""
    for i, prompt in enumerate(prompts):
        name = f"prompt {i + 1} (tracker.prompts[{i}])"
        if prompt.box is not None:
            check_box(prompt.box, f"{name} box", frame_size)
        if prompt.points is not None:
            check_points(prompt.points, prompt.labels, f"{name} points", frame_size)


def _bindable(endpoint: str) -> bool:
    sock = zmq.Context.instance().socket(zmq.PUB)
    try:
        sock.bind(endpoint)
        return True  # closing unbinds it for the node
    except zmq.ZMQError:
        return False
    finally:
        sock.close(linger=0)


def check_binds(config: RunConfig) -> None:
    """Every tcp endpoint the run binds (the feed, the control socket, a link or the status
    endpoint set to tcp): one that another process has (another run?) or that is not this
    machine's is named now, with the key that changes it, not when its node dies of it.
    (``auto`` binds the first free port itself; empty links are ipc in the run directory.)"""
    keys = sorted({key for spec in GRAPH for key in spec.binds} | {"status"})
    seen: dict[str, str] = {}
    for key in keys:
        endpoint = getattr(config.transport, key)
        if not endpoint.startswith("tcp://"):
            continue
        if endpoint in seen:
            raise PreflightError(
                f"transport.{seen[endpoint]} and transport.{key} are both {endpoint}: each "
                "endpoint a run binds must be its own"
            )
        seen[endpoint] = key
        if not _bindable(endpoint):
            auto = ", or to auto for the first free port from 5555" if key == "publish" else ""
            raise PreflightError(
                f"transport.{key} {endpoint} cannot be bound: the port is in use (another "
                "samstream run?) or the address is not this machine's; set "
                f"transport.{key} to another endpoint{auto}"
            )


def check_curve(config: RunConfig) -> RunConfig:
    """The CURVE key files exist and hold keys (CurveKeyError names the first bad one, and
    the key it was given for), before any node loads a model; ``config`` with their paths
    made absolute (a node may run in another directory)."""
    curve = config.transport.curve
    paths = check_key_files(curve)
    if not paths:
        return config
    transport = msgspec.structs.replace(
        config.transport, curve=msgspec.structs.replace(curve, **paths)
    )
    return msgspec.structs.replace(config, transport=transport)


def check_source(config: RunConfig) -> None:
    """The source and the prompts on its first frame: the checks that need no torch, made
    before anything imports it (a missing file or camera is reported in milliseconds)."""
    if not config.decoder.source:
        raise SourceError("no video source given: use --source or decoder.source")
    size = first_frame_size(config.decoder)
    if size is not None:
        check_prompts(config.tracker.prompts, size)


def preflight(config: RunConfig, *, live: bool) -> RunConfig:
    """Every other check that needs no node (after `check_source`); ``config`` with the
    weights' path made concrete.

    Raises PreflightError, FileNotFoundError or CheckpointError with the problem and what
    to change."""
    if not live and not config.tracker.prompts:
        raise PreflightError(
            "no object to follow: give --box X1 Y1 X2 Y2 or --point X Y (an offline run "
            "without a prompt would write empty masks for every frame)"
        )
    check_devices(config)
    check_binds(config)
    config = check_curve(config)
    return msgspec.structs.replace(config, weights=check_weights(config.weights))
