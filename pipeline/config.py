"""Typed configuration of a run: one frozen msgspec Struct per node, loaded from YAML.

Every default lives in this module, so a run needs no YAML file at all; ``configs/*.yaml``
restate or change them. Loading is strict because a typo that silently falls back to a
default is worse than an error: an unknown key, a value of the wrong type or out of range
raises :class:`ConfigError` naming the key by its dotted path (``encoder.batch_size``,
``tracker.prompts[0].box``) and the file (or ``--set`` override) it came from.

Endpoints: ``tcp://0.0.0.0:PORT`` and ``tcp://*:PORT`` are accepted, but without keys they
expose the feed (frames, masks, the prompt control socket) to anyone who can reach the
host: by default the pipeline's ZeroMQ sockets carry no authentication or encryption (the
launcher warns at start). ``transport.curve`` turns on CURVE (`pipeline.wire.curve`); otherwise
keep 127.0.0.1 unless the network is trusted.

``config_schema()`` (or ``python -m pipeline.config``) gives a config file's JSON Schema,
for editors and other tools; the rules across keys (a prompt needs a box or points, ...) and
the endpoint syntax are checked on loading only.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, reduce
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect
import yaml
from msgspec import Meta

from pipeline.endpoints import ENDPOINT_RULE, validate_endpoint


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key and file."""


# ---------------------------------------------------------------------------------------------
# Values with a rule (bounds, patterns, choices). The description is the rule in words: an
# error says the value "must be" it, and the JSON Schema carries it.

_FLOAT_MAX = sys.float_info.max  # msgspec's bounds are finite: le=_FLOAT_MAX rejects inf, NaN
_AtLeast0 = Annotated[int, Meta(ge=0, description="at least 0")]
_AtLeast1 = Annotated[int, Meta(ge=1, description="at least 1")]
_Positive = Annotated[float, Meta(gt=0, description="greater than 0")]  # also rejects NaN
_FinitePositive = Annotated[
    float, Meta(gt=0, le=_FLOAT_MAX, description="a finite number greater than 0")
]
_Unit = Annotated[float, Meta(ge=0, le=1, description="between 0 and 1")]
_Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX, description="a finite number")]
_NonEmpty = Annotated[str, Meta(min_length=1, description="a non-empty string")]
_PathText = Annotated[str, Meta(min_length=1, description="a non-empty path")]
_Device = Annotated[
    str, Meta(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
]
_ImageSize = Annotated[int, Meta(gt=0, multiple_of=16, description="a positive multiple of 16")]
_VideoSize = Annotated[
    str, Meta(pattern=r"^[1-9]\d*x[1-9]\d*$", description="WIDTHxHEIGHT, e.g. 1280x720")
]
_PixelFormat = Annotated[
    str, Meta(pattern=r"^[a-z0-9_]+$", description="a V4L2 format name such as mjpeg or yuyv422")
]
_Points = Annotated[
    tuple[tuple[_Finite, _Finite], ...],
    Meta(min_length=1, description="a non-empty list of [x, y] pairs"),
]
# Choices: described in their own order (msgspec.inspect sorts a Literal's values).
_RtspTransport = Annotated[Literal["tcp", "udp"], Meta(description="tcp | udp")]
_Backend = Annotated[
    Literal["auto", "torch", "onnxruntime", "openvino"],
    Meta(description="auto | torch | onnxruntime | openvino"),
]
_Dtype = Annotated[
    Literal["auto", "float32", "bfloat16", "float16"],
    Meta(description="auto | float32 | bfloat16 | float16"),
]
_EmbeddingDtype = Annotated[
    Literal["float16", "bfloat16", "float32"], Meta(description="float16 | bfloat16 | float32")
]
_Mode = Annotated[Literal["auto", "live", "offline"], Meta(description="auto | live | offline")]
_Label = Annotated[Literal[0, 1], Meta(description="0 (background) or 1 (foreground)")]
_BOX_RULE = "4 finite numbers [x1, y1, x2, y2] with x2 > x1 and y2 > y1"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A config section: immutable, and an unknown key is an error rather than ignored.
    (Each section says kw_only=True itself: msgspec applies it to a class's own fields.)"""


# ---------------------------------------------------------------------------------------------
# The sections. A __post_init__ holds the rules a type cannot say; msgspec runs it on loading
# (and on msgspec.structs.replace), and its ConfigError("key: problem") gets the key's path.


class DecoderConfig(_Section, kw_only=True):
    """Where frames come from (PyAV)."""

    source: str = ""  # file path, lavfi:..., rtsp://..., /dev/videoN; "" = given on the CLI
    max_frames: _AtLeast1 | None = None  # stop after this many frames; None = the whole source
    max_consecutive_errors: _AtLeast1 = 50  # decode errors in a row before giving up
    open_timeout_s: _Positive = 10.0
    stream_id: _NonEmpty = "cam0"
    # Live sources (RTSP, webcams): what counts as a stall, and how to come back from one.
    read_timeout_s: _Positive = 5.0  # no data for this long = stalled: reconnect
    rtsp_transport: _RtspTransport = "tcp"
    reconnect_initial_s: _Positive = 0.5  # first wait before a reconnect; doubles each failure
    reconnect_max_s: _Positive = 2.0  # cap on the wait between reconnect attempts
    give_up_after_s: _Positive | None = None  # end the run after the source is gone this long
    # Webcams (V4L2): what to ask the camera for; None = the driver's default.
    video_size: _VideoSize | None = None  # WxH, e.g. 1280x720
    framerate: _Positive | None = None  # frames per second
    pixel_format: _PixelFormat | None = None  # V4L2 input format: mjpeg, yuyv422, h264, ...

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError(
                f"reconnect_max_s: must be at least reconnect_initial_s "
                f"({self.reconnect_initial_s:g}), got {self.reconnect_max_s!r}"
            )


class EncoderConfig(_Section, kw_only=True):
    """The image encoder: one embedding per frame."""

    device: _Device = "auto"  # auto (cuda when there is a GPU) | cpu | cuda | cuda:N
    # auto: the fastest installed backend within tolerance of torch fp32 on this machine
    # (measured once, cached: pipeline.infer.encoder); torch on a GPU.
    backend: _Backend = "auto"  # openvino: CPU only
    # auto: the backend's measured best within tolerance (bf16 only where native) on a CPU,
    # float32 on a GPU; a named one is used as it is (autocast for torch).
    dtype: _Dtype = "auto"
    image_size: _ImageSize | None = None  # None: 1024, or 512 for live runs on a CPU
    # Frames encoded together when several wait; None: 4 on a GPU, 1 on a CPU.
    batch_size: _AtLeast1 | None = None
    threads: _AtLeast1 | None = None  # the backend's intra-op threads on a CPU; None: every core
    embedding_dtype: _EmbeddingDtype = "float16"  # on the wire


class PromptConfig(_Section, kw_only=True):
    """One object to follow, in source-frame pixels: a box, points, or both."""

    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2
    points: _Points | None = None  # (x, y) each
    labels: tuple[_Label, ...] | None = None  # None = all 1
    frame: _AtLeast0 = 0  # frame index from which the prompt applies

    def __post_init__(self) -> None:
        if self.box is None and self.points is None:
            raise ConfigError("box: a prompt needs a box or points (or both)")
        if self.box is not None:
            # The one box check (pipeline.prompts; where the box lies: per frame). Imported
            # here: it imports numpy, which a config that has no box need not.
            from pipeline.prompts import check_box

            try:
                check_box(self.box)
            except ValueError as err:  # its words: what is wrong with this box
                raise ConfigError(f"box: must be {_BOX_RULE}; {err}") from None
        n_points = len(self.points or ())
        if self.labels is not None and len(self.labels) != n_points:
            raise ConfigError(
                f"labels: needs one label per point: {len(self.labels)} labels, {n_points} points"
            )


class TrackerConfig(_Section, kw_only=True):
    """The prompt tracker: Kalman-predicted box prompts, gated mask-decoder measurements."""

    device: _Device = "auto"
    prompts: tuple[PromptConfig, ...] = ()
    min_score: _Unit = 0.5  # predicted-IoU score below which a measurement is poor
    min_agreement: _Unit = 0.3  # IoU of measured and predicted box below which it is poor
    max_coast_frames: _AtLeast0 = 15  # poor frames in a row before a track is lost
    confirm_frames: _AtLeast1 = 2  # good frames before a tentative track is tracked
    use_mask_prompt: bool = True  # feed the previous low-res mask back as a mask prompt
    exclusive_masks: bool = True  # a pixel belongs to at most one track (highest logit wins)
    process_noise: _FinitePositive = 1.0  # Kalman: std of unmodelled box acceleration, px/frame^2
    measurement_noise: _FinitePositive = 2.0  # Kalman: std of a measured box coordinate, pixels
    lost_after_gap_s: _Positive = 5.0  # a live source gone longer than this: every track is lost
    # Torch threads of its process on a CPU; None: a quarter of the cores.
    threads: _AtLeast1 | None = None
    # The mask decoder's backend (pipeline.infer.mask_decoder); auto: the fastest installed one
    # within tolerance of torch fp32 on this machine (measured once, cached); torch on a GPU.
    backend: _Backend = "auto"  # openvino: CPU only


class PublisherConfig(_Section, kw_only=True):
    """Fan-out of masks on the PUB socket, and file outputs."""

    out: _PathText | None = None  # directory for file outputs; None = publish only
    png: bool = True
    jsonl: bool = True
    mot: bool = True
    overlay: bool = True
    status_interval_s: _Positive = 1.0


class CurveConfig(_Section, kw_only=True):
    """CURVE authentication and encryption (`pipeline.wire.curve`), under ``transport.curve``:
    beside the endpoints it guards, and like them not part of a run's identity (a resumed
    run may use other keys). All null, the default: no keys, every socket as before (NULL
    mechanism: keep endpoints on 127.0.0.1 or ipc://). Key files are zmq.auth certificates,
    as `samstream keys` writes them: NAME.key (public) and NAME.key_secret (both halves)."""

    # The feed (PUB) and the prompt control socket: the server's key pair (.key_secret).
    server_secret_key: _PathText | None = None
    # A folder of the public .key files of the clients (subscribers, `samstream prompt`)
    # allowed on the feed and the control socket; required with server_secret_key (checked
    # at start with the files, so that the two can be given as two --set options).
    allowed_clients: _PathText | None = None
    # Internal links that are tcp:// (frames, embeddings, masks, status): one key pair
    # (.key_secret) both ends use, copied to every host that runs a node. ipc/inproc: unused.
    link_secret_key: _PathText | None = None


class TransportConfig(_Section, kw_only=True):
    """ZeroMQ endpoints and socket options."""

    frames: str = ""  # endpoints; "" = chosen by the launcher (ipc in a run dir)
    embeddings: str = ""
    masks: str = ""
    control: str = ""
    status: str = ""
    # The PUB socket consumers subscribe to. "auto": tcp://127.0.0.1:5555, or the next free
    # port when another run has it (the launcher prints the one it took).
    publish: str = "auto"
    hwm: _AtLeast1 = 8  # high-water mark (messages) of pipeline sockets
    max_message_bytes: int = 268435456  # MAXMSGSIZE on sockets facing the network; -1: none
    curve: CurveConfig = msgspec.field(default_factory=CurveConfig)  # keys; none = no CURVE

    def __post_init__(self) -> None:
        # Each endpoint, or its default: the launcher's choice ("") or, for the PUB socket,
        # which the launcher never chooses, "auto".
        for name in ("frames", "embeddings", "masks", "control", "status", "publish"):
            value, unset = getattr(self, name), "auto" if name == "publish" else ""
            try:
                if value != unset:
                    validate_endpoint(value)
            except ValueError:
                rule = f"{json.dumps(unset)} or {ENDPOINT_RULE}"
                raise ConfigError(f"{name}: must be {rule}, got {value!r}") from None
        # -1 or > 0: a rule msgspec's bounds cannot say.
        if self.max_message_bytes != -1 and self.max_message_bytes <= 0:
            raise ConfigError(
                "max_message_bytes: must be positive, or -1 for no limit, "
                f"got {self.max_message_bytes!r}"
            )


class LiveConfig(_Section, kw_only=True):
    """Delivery mode. Live: newest frame wins at every hop (drops counted), files play at
    their own frame rate, and each frame's processing time is held against a budget."""

    # auto: live for rtsp:// and webcams, offline otherwise
    mode: _Mode = "auto"
    # Per-frame processing budget; None: 12 on a GPU, 400 on a CPU.
    budget_ms: _Positive | None = None


class ResumeConfig(_Section, kw_only=True):
    """Continuing an interrupted offline run in publisher.out (``samstream run --resume``);
    where it continues is the launcher's to find (`pipeline.run.resume.plan_outputs`)."""

    enabled: bool = False  # continue the interrupted run in publisher.out (same source and config)


class RunConfig(_Section, kw_only=True):
    """A whole run: the weights and one section per node, plus the transport."""

    weights: _PathText = "mobile_sam.pt"
    decoder: DecoderConfig = msgspec.field(default_factory=DecoderConfig)
    encoder: EncoderConfig = msgspec.field(default_factory=EncoderConfig)
    tracker: TrackerConfig = msgspec.field(default_factory=TrackerConfig)
    publisher: PublisherConfig = msgspec.field(default_factory=PublisherConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)
    live: LiveConfig = msgspec.field(default_factory=LiveConfig)
    resume: ResumeConfig = msgspec.field(default_factory=ResumeConfig)


def config_schema() -> dict[str, Any]:
    """A config file's JSON Schema (draft 2020-12), made of the types loading checks with."""
    return msgspec.json.schema(RunConfig)


# ---------------------------------------------------------------------------------------------
# msgspec's errors in this module's words, and the types they are about.


@cache
def _run_type() -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(RunConfig)


def _without_none(tp: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """`X | None` -> X (a config union has one other member); any other type as it is."""
    if isinstance(tp, msgspec.inspect.UnionType):
        return next(t for t in tp.types if not isinstance(t, msgspec.inspect.NoneType))
    return tp


def _unwrapped(tp: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """`tp` without `| None` and without its Meta: the kind of value it takes."""
    tp = _without_none(tp)
    return tp.type if isinstance(tp, msgspec.inspect.Metadata) else tp


def _keys(tp: msgspec.inspect.Type) -> dict[str, msgspec.inspect.Type]:
    """The keys of a section type; {} for a value that has none."""
    tp = _unwrapped(tp)
    return {f.name: f.type for f in tp.fields} if isinstance(tp, msgspec.inspect.StructType) else {}


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _valid_keys(path: str, tp: msgspec.inspect.Type) -> str:
    keys = _keys(tp)
    return f"valid keys: {', '.join(keys)}" if keys else f"{path} has no sub-keys"


def _type_at(parts: Sequence[str | int], origin: str = "<config>") -> msgspec.inspect.Type:
    """The type of the value at ``parts`` (keys and list indices); ConfigError naming
    ``origin`` for an unknown key."""
    tp, path = _run_type(), ""
    for part in parts:
        if isinstance(part, int):
            items = _unwrapped(tp)
            is_tuple = isinstance(items, msgspec.inspect.TupleType)
            tp = items.item_types[part] if is_tuple else items.item_type
        elif part in (keys := _keys(tp)):
            tp = keys[part]
        else:
            raise ConfigError(
                f"{origin}: {_join(path, part)}: unknown key ({_valid_keys(path, tp)})"
            )
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    return tp


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _located(error: msgspec.ValidationError) -> tuple[str, bool, str, list[str | int]]:
    """msgspec's error as its text, whether it is about a mapping's key, and the path of the
    value it is about: dotted ("tracker.prompts[0].box") and as parts."""
    found = re.fullmatch(r"(.*?)(?: - at `(key` in `)?\$(.*)`)?", str(error), re.DOTALL)
    at = found[3] or ""
    parts = [name or int(index) for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", at)]
    return found[1], bool(found[2]), at.lstrip("."), parts


def _explain(error: msgspec.ValidationError, data: Any) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.encoder.batch_size`" in this module's words:
    "encoder.batch_size: must be at least 1, got 0"."""
    text, in_key, path, parts = _located(error)
    if isinstance(error.__cause__, ConfigError):  # a __post_init__ rule: "key: problem"
        return _join(path, error.__cause__)
    tp = _type_at(parts)  # of the value at `path` (for an unknown key: of its mapping)
    if unknown := re.fullmatch(r"Object contains unknown field `(.*)`", text):
        return f"{_join(path, unknown[1])}: unknown key ({_valid_keys(path, tp)})"
    where = path or "top level"
    if in_key:  # YAML reads `1:` or `true:` as a key that is not a string
        return f"{where}: every key must be a string ({_valid_keys(path, tp)})"
    value = reduce(lambda inner, part: inner[part], parts, data)
    wrong = re.fullmatch(r"Expected `([^`]+)`(?:, got `[^`]+`| of length (\d+), got \d+)", text)
    if wrong:
        expected = " or ".join(_TYPE_WORDS.get(name, name) for name in wrong[1].split(" | "))
        expected = f"a list of {wrong[2]} items" if wrong[2] else expected
        return f"{where}: expected {expected}, got {value!r} ({type(value).__name__})"
    # A value of the right type that breaks its rule (a bound, a pattern, a choice): the
    # rule in words is its Meta's description.
    tp = _without_none(tp)
    rules = (tp.extra_json_schema or {}) if isinstance(tp, msgspec.inspect.Metadata) else {}
    rule = rules.get("description")
    return f"{where}: must be {rule}, got {value!r}" if rule else f"{where}: {text}"


def _converted(data: Any, source: str, overrides: Sequence[Override] = ()) -> RunConfig:
    """``data`` as a RunConfig; ConfigError naming the key and what gave its value: the last
    override of it, else ``source``."""
    try:
        return msgspec.convert(data, RunConfig)
    except msgspec.ValidationError as error:
        parts = _located(error)[3]
        if isinstance(error.__cause__, ConfigError):  # a section's rule names its key
            parts.append(str(error.__cause__).partition(":")[0])
        given_by = (
            o.origin
            for o in reversed(overrides)
            if all(a == b for a, b in zip(o.key.split("."), parts, strict=False))
        )
        raise ConfigError(f"{next(given_by, source)}: {_explain(error, data)}") from None


# ---------------------------------------------------------------------------------------------
# Public API.


def config_from_dict(data: Mapping[str, Any], *, source: str = "<config>") -> RunConfig:
    """A validated RunConfig from plain data (parsed YAML or JSON); missing keys keep defaults.

    Strict: no str -> number coercion, bool is not a number; an int is fine for a float.
    Raises ConfigError("<source>: <dotted.key>: <problem>") on the first bad key.
    """
    return _converted(data, source)


def _lists(value: Any) -> Any:
    # msgspec.to_builtins keeps tuples; JSON (and a YAML file) have lists.
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, list | tuple) else value


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON-able data (tuples as lists) that `config_from_dict` turns back into `cfg`."""
    return _lists(msgspec.to_builtins(cfg))


def validate_config(cfg: RunConfig, *, source: str = "<config>") -> RunConfig:
    """`cfg` checked like a loaded file, e.g. after `msgspec.structs.replace` with CLI values
    (which runs only the rules across keys, not the types and bounds)."""
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


def _parse_yaml(text: str, context: str) -> Any:
    """yaml.safe_load (with unique keys); errors become one line: ``context`` (what the text
    is, e.g. "<file>: "), where, and what is wrong."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context
        raise ConfigError(f"{context}not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{context}not valid YAML: {error}") from None


@dataclass(frozen=True)
class Override:
    """One value for one key over the config file's: ``key`` dotted (``encoder.batch_size``;
    a whole section takes a mapping, merged into the file's), ``origin`` what gave it, named
    in errors (``--set encoder.batch_size=2``, ``--box``)."""

    key: str
    value: Any
    origin: str = "override"


def parse_set(text: str) -> Override:
    """The override of a ``--set section.key=value`` option, the value parsed as YAML so that
    ``4``, ``true``, ``null`` and ``[1, 2, 3, 4]`` mean what they say; ConfigError for an
    unknown key or text that is no YAML."""
    origin = f"--set {text}"
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{origin}: expected section.key=value, e.g. encoder.batch_size=2")
    tp = _type_at(key.split("."), origin)
    value = _parse_yaml(value_text, f"{origin}: {key}: value is ")
    is_text = isinstance(_unwrapped(tp), msgspec.inspect.StrType)
    if is_text and value is not None and not isinstance(value, str | list | dict):
        value = value_text.strip()  # `decoder.stream_id=7` means the string "7", not an error
    return Override(key, value, origin)


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = ()) -> RunConfig:
    """The run's configuration: defaults, then the YAML file at ``path``, then ``overrides``
    (the command line's, the last one winning), validated once. Raises ConfigError naming
    the dotted key and where its value came from: the file, or the override's origin."""
    data: Any = {}
    source = "<defaults>" if path is None else str(path)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{source}: cannot read config file: {error}") from None
        data = _parse_yaml(text, f"{source}: ")
        data = {} if data is None else data  # an empty (or all-comment) file is all defaults
    for override in overrides:
        _type_at(override.key.split("."), override.origin)
    if not isinstance(data, dict):
        return _converted(data, source)  # raises: the top level must be a mapping
    data = copy.deepcopy(data)  # each override's value at its key, in order
    for override in overrides:
        *parents, last = override.key.split(".")
        section = data
        for part in parents:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):  # the file has a value where a section goes
                return _converted(data, source)  # raises, naming the file
        current = section.get(last)
        merge = isinstance(current, dict) and isinstance(override.value, Mapping)
        section[last] = {**current, **override.value} if merge else override.value
    return _converted(data, source, overrides)


if __name__ == "__main__":  # python -m pipeline.config > config-schema.json
    print(json.dumps(config_schema(), indent=2))
