"""Typed configuration of a run: one frozen dataclass per node, loaded from YAML.

Every default lives in this module, so a run needs no YAML file at all; ``configs/*.yaml``
restate or change them. Loading is strict because a typo that silently falls back to a
default is worse than an error: an unknown key, a value of the wrong type or out of range
raises :class:`ConfigError` naming the key by its dotted path (``encoder.batch_size``,
``tracker.prompts[0].box``) and the file (or ``--set`` override) it came from.

Endpoints: ``tcp://0.0.0.0:PORT`` and ``tcp://*:PORT`` are accepted, but without keys they
expose the feed (frames, masks, the prompt control socket) to anyone who can reach the
host: by default the pipeline's ZeroMQ sockets carry no authentication or encryption (the
launcher warns at start). ``transport.curve`` turns on CURVE (`pipeline.curve`); otherwise
keep 127.0.0.1 unless the network is trusted.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key and file."""


@dataclass(frozen=True)
class DecoderConfig:
    """Where frames come from (PyAV)."""

    source: str = ""  # file path, lavfi:..., rtsp://..., /dev/videoN; "" = given on the CLI
    max_frames: int | None = None  # stop after this many frames; None = the whole source
    max_consecutive_errors: int = 50  # decode errors in a row before giving up
    open_timeout_s: float = 10.0
    stream_id: str = "cam0"
    # Live sources (RTSP, webcams): what counts as a stall, and how to come back from one.
    read_timeout_s: float = 5.0  # no data for this long = stalled: reconnect
    rtsp_transport: str = "tcp"  # tcp | udp
    reconnect_initial_s: float = 0.5  # first wait before a reconnect; doubles each failure
    reconnect_max_s: float = 2.0  # cap on the wait between reconnect attempts
    give_up_after_s: float | None = None  # end the run after the source is gone this long
    # Webcams (V4L2): what to ask the camera for; None = the driver's default.
    video_size: str | None = None  # WxH, e.g. 1280x720
    framerate: float | None = None  # frames per second
    pixel_format: str | None = None  # V4L2 input format: mjpeg, yuyv422, h264, ...


@dataclass(frozen=True)
class EncoderConfig:
    """The image encoder: one embedding per frame."""

    device: str = "auto"  # auto (cuda when there is a GPU) | cpu | cuda | cuda:N
    # auto: the fastest installed backend within tolerance of torch fp32 on this machine
    # (measured once, cached: pipeline.backends); torch on a GPU.
    backend: str = "auto"  # auto | torch | onnxruntime | openvino (CPU only)
    # auto: the backend's measured best within tolerance (bf16 only where native) on a CPU,
    # float32 on a GPU; a named one is used as it is (autocast for torch).
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    image_size: int | None = None  # multiple of 16; None: 1024, or 512 for live runs on a CPU
    batch_size: int | None = None  # frames encoded together when several wait; None: 4 GPU, 1 CPU
    threads: int | None = None  # the backend's intra-op threads on a CPU; None: every core
    embedding_dtype: str = "float16"  # float16 | bfloat16 | float32 on the wire


@dataclass(frozen=True)
class PromptConfig:
    """One object to follow, in source-frame pixels: a box, points, or both."""

    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2
    points: tuple[tuple[float, float], ...] | None = None  # (x, y) each
    labels: tuple[int, ...] | None = None  # 1 foreground / 0 background; None = all 1
    frame: int = 0  # frame index from which the prompt applies


@dataclass(frozen=True)
class TrackerConfig:
    """The prompt tracker: Kalman-predicted box prompts, gated mask-decoder measurements."""

    device: str = "auto"
    prompts: tuple[PromptConfig, ...] = ()
    min_score: float = 0.5  # predicted-IoU score below which a measurement is poor
    min_agreement: float = 0.3  # IoU of measured and predicted box below which it is poor
    max_coast_frames: int = 15  # poor frames in a row before a track is lost
    confirm_frames: int = 2  # good frames before a tentative track is tracked
    use_mask_prompt: bool = True  # feed the previous low-res mask back as a mask prompt
    exclusive_masks: bool = True  # a pixel belongs to at most one track (highest logit wins)
    process_noise: float = 1.0  # Kalman: std of unmodelled box acceleration, pixels/frame^2
    measurement_noise: float = 2.0  # Kalman: std of a measured box coordinate, pixels
    lost_after_gap_s: float = 5.0  # a live source gone longer than this: every track is lost
    threads: int | None = None  # torch threads of its process on a CPU; None: a quarter of cores
    # The mask decoder's backend (pipeline.decoder_backends); auto: the fastest installed one
    # within tolerance of torch fp32 on this machine (measured once, cached); torch on a GPU.
    backend: str = "auto"  # auto | torch | onnxruntime | openvino (CPU only)


@dataclass(frozen=True)
class PublisherConfig:
    """Fan-out of masks on the PUB socket, and file outputs."""

    out: str | None = None  # directory for file outputs; None = publish only
    png: bool = True
    jsonl: bool = True
    mot: bool = True
    overlay: bool = True
    status_interval_s: float = 1.0


@dataclass(frozen=True)
class CurveConfig:
    """CURVE authentication and encryption (`pipeline.curve`), under ``transport.curve``:
    beside the endpoints it guards, and like them not part of a run's identity (a resumed
    run may use other keys). All null, the default: no keys, every socket as before (NULL
    mechanism: keep endpoints on 127.0.0.1 or ipc://). Key files are zmq.auth certificates,
    as `samstream keys` writes them: NAME.key (public) and NAME.key_secret (both halves)."""

    # The feed (PUB) and the prompt control socket: the server's key pair (.key_secret).
    server_secret_key: str | None = None
    # A folder of the public .key files of the clients (subscribers, `samstream prompt`)
    # allowed on the feed and the control socket; required with server_secret_key (checked
    # at start with the files, so that the two can be given as two --set options).
    allowed_clients: str | None = None
    # Internal links that are tcp:// (frames, embeddings, masks, status): one key pair
    # (.key_secret) both ends use, copied to every host that runs a node. ipc/inproc: unused.
    link_secret_key: str | None = None


@dataclass(frozen=True)
class TransportConfig:
    """ZeroMQ endpoints and socket options."""

    frames: str = ""  # endpoints; "" = chosen by the launcher (ipc in a run dir)
    embeddings: str = ""
    masks: str = ""
    control: str = ""
    status: str = ""
    # The PUB socket consumers subscribe to. "auto": tcp://127.0.0.1:5555, or the next free
    # port when another run has it (the launcher prints the one it took).
    publish: str = "auto"
    hwm: int = 8  # high-water mark (messages) of pipeline sockets
    max_message_bytes: int = 268435456  # MAXMSGSIZE on sockets facing the network
    curve: CurveConfig = field(default_factory=CurveConfig)  # keys; none = no CURVE


@dataclass(frozen=True)
class LiveConfig:
    """Delivery mode. Live: newest frame wins at every hop (drops counted), files play at
    their own frame rate, and each frame's processing time is held against a budget."""

    mode: str = "auto"  # auto (live for rtsp:// and webcams, offline otherwise) | live | offline
    budget_ms: float | None = None  # per-frame processing budget; None: 12 on a GPU, 400 on a CPU


@dataclass(frozen=True)
class ResumeConfig:
    """Continuing an interrupted offline run in publisher.out (``samstream run --resume``).

    Only ``enabled`` is for users; the launcher fills in the rest from the state the
    interrupted run left in the output directory."""

    enabled: bool = False  # continue the interrupted run in publisher.out (same source and config)
    frames_done: int = 0  # frames complete in publisher.out: the publisher starts after them
    tracker_frame: int | None = None  # frame of the tracker snapshot to start from; None: afresh


@dataclass(frozen=True)
class RunConfig:
    """A whole run: the weights and one section per node, plus the transport."""

    weights: str = "mobile_sam.pt"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)


# ---------------------------------------------------------------------------------------------
# Value checks. Types are checked generically from the field annotations (_coerce); these
# tables hold only what a type cannot say. A check returns None when the value is fine.

_Check = Callable[[Any], str | None]


def _rule(ok: Callable[[Any], bool], must: str) -> _Check:
    # None passes: `X | None` fields have already been type-checked to allow it.
    return lambda v: None if v is None or ok(v) else f"must be {must}"


def _choice(*options: str) -> _Check:
    return _rule(lambda v: v in options, " | ".join(options))


_AT_LEAST_1 = _rule(lambda v: v >= 1, "at least 1")
_POSITIVE = _rule(lambda v: v > 0, "greater than 0")  # also rejects NaN
_UNIT = _rule(lambda v: 0 <= v <= 1, "between 0 and 1")
_FINITE_POSITIVE = _rule(lambda v: math.isfinite(v) and v > 0, "a finite number greater than 0")
_DEVICE = _rule(
    lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"
)


def _is_box(value: Any) -> bool:
    """A box `pipeline.prompts.check_box` takes (where it lies is checked per frame)."""
    from pipeline.prompts import check_box  # the one definition; imports numpy

    try:
        check_box(value)
    except ValueError:
        return False
    return True


def _is_endpoint(value: str) -> bool:
    """Empty (the launcher chooses) or a ZeroMQ endpoint pipeline.transport accepts."""
    from pipeline.transport import validate_endpoint  # the one definition; imports zmq

    if value == "":
        return True
    try:
        validate_endpoint(value)
    except ValueError:
        return False
    return True


_ENDPOINT = _rule(_is_endpoint, '"" or tcp://host:port (port 1-65535), ipc://path or inproc://name')

_FIELD_CHECKS: dict[type, dict[str, _Check]] = {
    RunConfig: {"weights": _rule(bool, "a non-empty path")},
    DecoderConfig: {
        "max_frames": _AT_LEAST_1,
        "max_consecutive_errors": _AT_LEAST_1,
        "open_timeout_s": _POSITIVE,
        "stream_id": _rule(bool, "a non-empty string"),
        "read_timeout_s": _POSITIVE,
        "rtsp_transport": _choice("tcp", "udp"),
        "reconnect_initial_s": _POSITIVE,
        "reconnect_max_s": _POSITIVE,
        "give_up_after_s": _POSITIVE,
        "video_size": _rule(
            lambda v: re.fullmatch(r"[1-9]\d*x[1-9]\d*", v) is not None,
            "WIDTHxHEIGHT, e.g. 1280x720",
        ),
        "framerate": _POSITIVE,
        "pixel_format": _rule(
            lambda v: re.fullmatch(r"[a-z0-9_]+", v) is not None,
            "a V4L2 format name such as mjpeg or yuyv422",
        ),
    },
    EncoderConfig: {
        "device": _DEVICE,
        "backend": _choice("auto", "torch", "onnxruntime", "openvino"),
        "dtype": _choice("auto", "float32", "bfloat16", "float16"),
        "image_size": _rule(lambda v: v > 0 and v % 16 == 0, "a positive multiple of 16"),
        "batch_size": _AT_LEAST_1,
        "threads": _AT_LEAST_1,
        "embedding_dtype": _choice("float16", "bfloat16", "float32"),
    },
    PromptConfig: {
        "box": _rule(
            lambda b: _is_box(b), "4 finite numbers [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
        ),
        "points": _rule(
            lambda p: len(p) > 0 and all(math.isfinite(c) for xy in p for c in xy),
            "a non-empty list of finite [x, y] pairs",
        ),
        "labels": _rule(lambda ls: set(ls) <= {0, 1}, "0 (background) or 1 (foreground) each"),
        "frame": _rule(lambda v: v >= 0, "at least 0"),
    },
    TrackerConfig: {
        "device": _DEVICE,
        "min_score": _UNIT,
        "min_agreement": _UNIT,
        "max_coast_frames": _rule(lambda v: v >= 0, "at least 0"),
        "confirm_frames": _AT_LEAST_1,
        "process_noise": _FINITE_POSITIVE,
        "measurement_noise": _FINITE_POSITIVE,
        "lost_after_gap_s": _POSITIVE,
        "threads": _AT_LEAST_1,
        "backend": _choice("auto", "torch", "onnxruntime", "openvino"),
    },
    ResumeConfig: {
        "frames_done": _rule(lambda v: v >= 0, "at least 0"),
        "tracker_frame": _rule(lambda v: v >= 0, "at least 0"),
    },
    LiveConfig: {
        "mode": _choice("auto", "live", "offline"),
        "budget_ms": _POSITIVE,
    },
    PublisherConfig: {
        "out": _rule(bool, "a non-empty path or null"),
        "status_interval_s": _POSITIVE,
    },
    CurveConfig: dict.fromkeys(
        ("server_secret_key", "allowed_clients", "link_secret_key"),
        _rule(bool, "a non-empty path or null"),
    ),
    TransportConfig: {
        **dict.fromkeys(("frames", "embeddings", "masks", "control", "status"), _ENDPOINT),
        # Unlike the internal links, the PUB endpoint is never chosen by the launcher.
        "publish": _rule(
            lambda v: v == "auto" or (v and _is_endpoint(v)),
            "auto, tcp://host:port (port 1-65535), ipc://path or inproc://name",
        ),
        "hwm": _AT_LEAST_1,
        "max_message_bytes": _rule(lambda v: v == -1 or v > 0, "positive, or -1 for no limit"),
    },
}


def _check_prompt(prompt: PromptConfig) -> tuple[str, str] | None:
    """Checks across a prompt's fields: (field, problem) or None."""
    if prompt.box is None and prompt.points is None:
        return "box", "a prompt needs a box or points (or both)"
    n_points = len(prompt.points or ())
    if prompt.labels is not None and len(prompt.labels) != n_points:
        return (
            "labels",
            f"needs one label per point: {len(prompt.labels)} labels, {n_points} points",
        )
    return None


def _check_decoder(decoder: DecoderConfig) -> tuple[str, str] | None:
    if decoder.reconnect_max_s < decoder.reconnect_initial_s:
        return "reconnect_max_s", (
            f"must be at least reconnect_initial_s ({decoder.reconnect_initial_s:g})"
        )
    return None


_OBJECT_CHECKS: dict[type, Callable[[Any], tuple[str, str] | None]] = {
    PromptConfig: _check_prompt,
    DecoderConfig: _check_decoder,
}


# ---------------------------------------------------------------------------------------------
# Generic, strict type checking driven by the dataclass annotations.


@cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations `from __future__` leaves behind.
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other type -> (type, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    if optional:
        return f"{_describe(inner)} or null"
    if dataclasses.is_dataclass(inner):
        return "a mapping"
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        return "a list" if args[-1] is Ellipsis else f"a list of {len(args)} items"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names[inner]


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked against annotation `tp` and converted (lists -> tuples, int -> float)."""
    inner, optional = _split_optional(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, path)
    bad = ConfigError(f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        if not isinstance(value, list | tuple):
            raise bad
        if args[-1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise bad
        return tuple(
            _coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True))
        )
    # bool is a subclass of int: `batch_size: true` must not pass as 1.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if inner is float and is_number:
        return float(value)
    if (inner is int and is_number and isinstance(value, int)) or (
        inner in (bool, str) and isinstance(value, inner)
    ):
        return value
    raise bad


def _build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass `cls` from a mapping, every key and value checked."""
    hints = _hints(cls)
    if not isinstance(data, Mapping):
        where = path or "top level"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    for key in data:
        if key not in hints:
            valid = ", ".join(hints)
            raise ConfigError(f"{_join(path, key)}: unknown key (valid keys: {valid})")
    obj = cls(**{k: _coerce(v, hints[k], _join(path, k)) for k, v in data.items()})
    for name, check in _FIELD_CHECKS.get(cls, {}).items():
        value = getattr(obj, name)
        if problem := check(value):
            raise ConfigError(f"{_join(path, name)}: {problem}, got {value!r}")
    if (object_check := _OBJECT_CHECKS.get(cls)) and (found := object_check(obj)):
        raise ConfigError(f"{_join(path, found[0])}: {found[1]}")
    return obj


# ---------------------------------------------------------------------------------------------
# Public API.


def config_from_dict(data: Mapping[str, Any], *, source: str = "<config>") -> RunConfig:
    """A validated RunConfig from plain data (parsed YAML or JSON); missing keys keep defaults.

    Raises ConfigError("<source>: <dotted.key>: <problem>") on the first bad key.
    """
    try:
        return _build(RunConfig, data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON-able data (tuples as lists) that `config_from_dict` turns back into `cfg`."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    return plain(cfg)


def validate_config(cfg: RunConfig, *, source: str = "<config>") -> RunConfig:
    """`cfg` checked like a loaded file, e.g. after `dataclasses.replace` with CLI values."""
    return config_from_dict(config_to_dict(cfg), source=source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error.

    PyYAML keeps the last duplicate silently, which hides exactly the kind of edit mistake a
    strict config exists to catch.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key_node.tag, key_node.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    """yaml.safe_load (with unique keys); errors become one line: where, and what is wrong."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}") from None


def _apply_override(cfg: RunConfig, override: str) -> RunConfig:
    """`cfg` with one `section.key=value` override applied and the result re-validated."""
    source = f"--set {override}"
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected section.key=value, e.g. encoder.batch_size=2")
    tp: Any = RunConfig
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(tp):
            parent = ".".join(parts[:depth])
            raise ConfigError(f"{source}: {dotted}: unknown key ({parent} has no sub-keys)")
        if part not in _hints(tp):
            valid = ", ".join(_hints(tp))
            raise ConfigError(f"{source}: {dotted}: unknown key (valid keys: {valid})")
        tp = _hints(tp)[part]
    try:
        value = _parse_yaml(text)
    except ConfigError as error:
        raise ConfigError(f"{source}: {key}: value is {error}") from None
    inner, _ = _split_optional(tp)
    if inner is str and value is not None and not isinstance(value, str | list | dict):
        value = text.strip()  # `decoder.stream_id=7` means the string "7", not an error
    data = config_to_dict(cfg)
    section = data
    for part in parts[:-1]:
        section = section[part]
    current = section[parts[-1]]
    # A mapping given for a whole section updates it rather than resetting unnamed keys.
    both_mappings = isinstance(current, dict) and isinstance(value, Mapping)
    section[parts[-1]] = {**current, **value} if both_mappings else value
    return config_from_dict(data, source=source)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run's configuration: defaults, then the YAML file at `path`, then `overrides`.

    Each override is `section.key=value` (as from `--set`), the value parsed as YAML so that
    `4`, `true`, `null` and `[1, 2, 3, 4]` mean what they say. Raises ConfigError naming the
    file or override and the dotted key for any problem.
    """
    data: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{source}: cannot read config file: {error}") from None
        try:
            data = _parse_yaml(text)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
        data = {} if data is None else data  # an empty (or all-comment) file is all defaults
    cfg = config_from_dict(data, source=source)
    for override in overrides:
        cfg = _apply_override(cfg, override)
    return cfg
