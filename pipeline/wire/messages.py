"""Every message of the pipeline and its wire format (schema version 2).

Data messages (ZeroMQ multipart)
--------------------------------
A message is one ZeroMQ multipart message of ``1 + n`` parts:

- part 0: a UTF-8 JSON object (standard JSON: no NaN / Infinity), the *header*;
- parts 1..n: the raw buffers listed in ``header["buffers"]``, in that order.

Every header holds::

    "kind":    "frame" | "embedding" | "masks" | "status" | "end"
    "v":       2                      (SCHEMA_VERSION; a reader rejects any other value)
    "buffers": [{"name": str, "dtype": str, "shape": [int, ...]}, ...]   ([] when none)

A buffer is a raw C-contiguous (row-major) array of ``prod(shape)`` elements of ``dtype``,
little-endian; dtype is one of ``uint8``, ``uint16``, ``float16`` (IEEE half), ``float32``.
Its part is exactly ``prod(shape) * itemsize`` bytes.

The fields beside ``kind``/``v``/``buffers``, per kind. ``meta`` is
``{"stream_id": str, "seq": int, "frame_index": int, "pts": int | null,
"time_base": [num, den], "capture_time": float (Unix seconds), "session": int}``; seconds =
pts * num / den. ``session`` (optional, default 0) is the source's connection number: it grows
by one at every reconnect of a live source. ``source_pts`` (int, optional) is the container's
pts of a frame whose timestamp was repaired; only such frames carry it.

``timings`` is ``{stage: milliseconds}`` for the stages a frame has been through so far:
``"decode"``, ``"encoder"``, ``"tracker"``, ``"publish"``, and on the published masks
``"latency"``: capture to publish, wall clock.

- ``"frame"``: ``meta``, ``timings``. Buffers: ``image`` uint8 ``[H, W, 3]`` RGB.
- ``"embedding"``: ``meta``, ``embedding_dtype`` ("float16" | "bfloat16" | "float32"),
  ``original_size`` [H, W], ``input_size`` [h, w] (after the longest-side resize, before
  padding), ``timings`` {stage: milliseconds}. Buffers: ``embedding`` ``[C, h', w']`` whose
  wire dtype is float16 / uint16 / float32 (bfloat16 travels as its uint16 bit patterns),
  then optionally ``image`` uint8 ``[H, W, 3]``.
- ``"masks"``: ``meta``, ``frame_size`` [H, W], ``timings``, ``tracks``: a list of
  ``{"track_id": int, "box": [x1, y1, x2, y2] (pixels), "score": float, "state":
  "tentative" | "tracked" | "coasting" | "lost", "frames_since_update": int,
  "innovation": float}``, and ``mask_windows``: one ``[x1, y1, x2, y2]`` per track (ints,
  ``0 <= x1 <= x2 <= W``, ``0 <= y1 <= y2 <= H``, exclusive x2/y2): the window of the frame
  outside which track i's (H, W) bool mask is False (x1 == x2 or y1 == y2: an empty mask).
  Buffers: ``masks`` uint8 ``[B]``, then optionally ``image`` uint8 ``[H, W, 3]``. ``masks``
  holds the windows one after another, in track order: window i's ``h * w`` pixels
  (``h = y2 - y1``, ``w = x2 - x1``) row-major, eight to a byte, pixel ``k`` in bit
  ``7 - (k % 8)`` of the window's byte ``k // 8`` (the first pixel in the most significant
  bit, as ``numpy.packbits(window, bitorder="big")``); each window starts on a byte of its
  own and the unused low bits of its last byte are zero. So ``B = sum(ceil(h * w / 8))``.
  Pixel (x, y) of track i is set when ``x1 <= x < x2``, ``y1 <= y < y2`` and its bit
  ``(y - y1) * w + (x - x1)`` is 1.
- ``"status"``: ``node`` str, ``state`` (below), ``time`` float (Unix seconds), ``counters``
  {str: int}, ``detail`` {str: any JSON}. No buffers.
- ``"end"``: ``stream_id`` str, ``frames`` int, ``reason`` str ("eof", "max_frames",
  "error: ...", "stopped"). No buffers.

A status ``state`` is one of (STATUS_STATES): "starting" (setting up, models loading),
"running", "over_budget" (live publisher: frames over the per-frame budget since the last
status), "stalled" / "lost" / "reconnecting" (decoder: the live source is silent, gone,
being reconnected), "degraded" (sent by the launcher: a node died and is being restarted),
"done" (the stream ended), "stopped" (a stop request), "failed" (``detail["error"]`` says why).

Readers ignore header fields they do not know. ``seq`` counts 0, 1, 2, ... per stream id, so
a consumer detects loss by gaps.

Versions: 2 sends each mask as its window (``mask_windows`` and the windows' bits), so a
message grows with the objects' areas, not with the frame's; 1 sent ``masks`` as bool
``[N, H, W]``, every track's whole frame of bits.

Prompt control (REQ/REP, one part, UTF-8 JSON)
----------------------------------------------
Request (PromptCommand): ``{"op": "add" | "update" | "remove" | "list", "track_id": int |
null, "box": [x1, y1, x2, y2] | null, "points": [[x, y], ...] | null, "labels": [int, ...] |
null, "frame": int | null}``; only ``op`` is required. "add" takes a box and/or points (with
their labels, 1 foreground / 0 background), a free ``track_id`` and a start ``frame``, all
optional but the prompt; "update" a ``track_id`` and a box (no points: a correction restarts
the track at the box); "remove" a ``track_id``; ``frame`` is for "add" only.

Reply (PromptReply): ``{"ok": bool, "error": str | null, "track_id": int | null, "frame":
int | null, "tracks": [TrackListing, ...]}``, a listing being ``{"track_id": int, "state":
str, "box": [x1, y1, x2, y2] | null, "score": float, "frames_since_update": int, "pending":
bool, "start_frame": int | null}``. Both reject fields they do not know (a typo must not pass
for an absent field).

A command is checked and answered at once, also while the tracker is in the middle of a
frame, and applied between frames, in the order the commands came: no frame in progress
changes. ``ok`` means it is queued, checked against the tracker as it will be when the
command applies (after the last finished frame and the commands before it); ``frame`` is the
first frame index it changes (an "add" with a later ``frame``: that one), for "list" the
frame the listing leads into. A live tracker may skip frames, so the first frame published
with the change may come later; none before ``frame`` has it. The checks that need the
frame's size wait for the first frame when the tracker has seen none yet: a prompt outside
it then shows as a track reported "lost" once, at its start frame. A queued prompt is
rescaled with the tracks when the resolution changes. A command queued when the tracker
dies is lost with it. ``tracks``: every track and prompt as the tracker will enter
``frame``: rows of commands not yet through a frame say ``pending``.

Changes to the control protocol (it has no version number: a client must match the
tracker, as each side refuses fields it does not know): replies carry ``frame``; listing rows
key the id ``track_id`` (it was ``id``), as every other record does; "update" with points and
a ``frame`` on any op but "add" are refused (the tracker used to ignore both, and to refuse
an update with points but no box).

``wire_schema()`` (or ``python -m pipeline.wire.messages``) gives all of this as a JSON Schema
for consumers in other languages, less what JSON Schema cannot say (byte lengths, windows).

Arrays decoded here are read-only views over the received buffers (no copy), except the
unpacked mask windows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypedDict, TypeVar, get_args

import msgspec
import numpy as np

from pipeline.wire.masks import RegionMask, as_region_masks, stack_dense

SCHEMA_VERSION = 2
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes per track: 1 MiB is ~thousands
MAX_TRACK_ID = 65535
"""Track ids are 1..65535: the instance-id PNGs hold one id per pixel, 0 being background, in
8 bits (a palette PNG, the DAVIS convention) while every id of a frame is at most 255, in 16
bits past that (``pipeline.outputs.files``). Ids are never reused within a run, so this is also
how many objects a run can be given (without naming ids explicitly)."""


class TrackState(str, Enum):
    """A track's state (one definition: the tracker's and the wire's); on the wire as its
    value, and equal to it (``TrackState.TRACKED == "tracked"``)."""

    TENTATIVE = "tentative"  # fewer than confirm_frames trusted measurements so far
    TRACKED = "tracked"  # confirmed and measured this frame
    COASTING = "coasting"  # no trustworthy measurement this frame: box is the prediction
    LOST = "lost"  # reported once, then dropped

    def __str__(self) -> str:  # "lost", not "TrackState.LOST", in text and f-strings
        return self.value


_SourceState = Literal["stalled", "lost", "reconnecting"]  # a live source's, from the decoder
StatusState = Literal[
    "starting", "running", "over_budget", _SourceState, "degraded", "done", "stopped", "failed"
]
PromptOp = Literal["add", "update", "remove", "list"]
RawDtype = Literal["uint8", "uint16", "float16", "float32"]
EmbeddingDtype = Literal["float16", "bfloat16", "float32"]
TRACK_STATES: tuple[str, ...] = tuple(state.value for state in TrackState)
STATUS_STATES: tuple[str, ...] = get_args(StatusState)
PROMPT_OPS: tuple[str, ...] = get_args(PromptOp)

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Box = tuple[float, float, float, float]

# Raw buffer dtypes a reader accepts, pinned little-endian so the wire does not depend on
# the sender's byte order.
_RAW_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in get_args(RawDtype)}
# embedding_dtype -> dtype name of the array that carries it (numpy has no bfloat16).
_EMBEDDING_WIRE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


class MessageError(ValueError):
    """A message that does not follow the wire format; the text says what is wrong."""


class _HasBuffer(Protocol):
    """A received part such as ``zmq.Frame`` (``recv_multipart(copy=False)``)."""

    @property
    def buffer(self) -> memoryview: ...


Part = bytes | bytearray | memoryview | _HasBuffer


# ----------------------------------------------------------------------------- helpers


def _require(condition: bool, text: str) -> None:
    if not condition:
        raise MessageError(text)


def _json_default(value: Any) -> Any:
    # Producers often hand over numpy scalars (np.float32 scores, np.int64 ids).
    if isinstance(value, np.generic):
        return value.item()
    raise MessageError(f"cannot put a {type(value).__name__} into a JSON header")


def _dump_json(obj: dict[str, Any]) -> bytes:
    """Standard JSON, refused here when it cannot be: msgspec's encoder would write NaN as
    null, which a reader refuses far from the cause, so the stdlib encoder writes headers."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default).encode()
    except MessageError:
        raise
    except ValueError as exc:  # NaN / Infinity: not standard JSON, non-Python readers choke
        raise MessageError(f"header is not valid JSON: {exc}") from exc


def _byte_view(part: Part, what: str) -> memoryview:
    """A flat byte view of a received part, without copying."""
    try:
        view = memoryview(getattr(part, "buffer", part))
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise MessageError(f"{what} is not a byte buffer ({type(part).__name__})") from exc


def _explain(err: msgspec.ValidationError, what: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.meta.seq`" in this module's words:
    "header: field 'meta.seq' must be int, got str"."""
    text, _, path = str(err).partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    for pattern, words in (
        (r"Object missing required field `(\w+)`", r"missing field '\1'"),
        (r"Object contains unknown field `(\w+)`", r"unknown field '\1'"),
        (r"Expected `array` of length ([^,]+)(, got \d+)?", r"must have \1 items"),
        (r"Invalid enum value (.+)", r"is \1, not one of the values it may have"),
        (r"Expected `([^`]+?)(?: \| null)?`", r"must be \1"),  # a wrong value is not null
        (r"got `([^`]+)`", r"got \1"),
    ):
        text = re.sub(pattern, words, text)
    sep = " " if text.startswith(("must", "is ")) else ": "
    return f"{what}: field '{path}'{sep}{text}" if path else f"{what}{sep}{text}"


def _decode(kind: Any, data: Part | str, what: str) -> Any:
    """``data`` parsed and checked as ``kind``; whatever is wrong is a MessageError."""
    text = data if isinstance(data, str) else _byte_view(data, what)
    size, unit = (len(text), "characters") if isinstance(text, str) else (text.nbytes, "bytes")
    # Checked before parsing: what a hostile peer sends costs no more than this.
    _require(size <= MAX_HEADER_BYTES, f"{what} is {size} {unit}, more than {MAX_HEADER_BYTES}")
    try:
        return msgspec.json.decode(text, type=kind)
    except msgspec.ValidationError as err:  # wrong types, missing fields, huge integers
        raise MessageError(_explain(err, what)) from None
    except msgspec.DecodeError as err:
        if not isinstance(text, str):
            try:
                text = str(text, "utf-8")
            except UnicodeDecodeError as exc:
                raise MessageError(f"{what} is not UTF-8: {exc}") from None
        nan = " (standard JSON has no NaN or Infinity)" if re.search("NaN|Infinity", text) else ""
        raise MessageError(f"{what} is not valid JSON{nan}: {err}") from None
    except RecursionError:
        raise MessageError(f"{what} is nested too deeply to be a samstream header") from None


def _raw_buffer(name: str, array: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    """The header spec and a zero-copy byte view of one raw buffer."""
    wire_dtype = _RAW_DTYPES.get(array.dtype.name)
    _require(wire_dtype is not None, f"buffer '{name}': dtype {array.dtype} cannot be sent")
    # Copies only when the array is not C-contiguous or not little-endian.
    array = np.ascontiguousarray(array, dtype=wire_dtype)
    spec = {"name": name, "dtype": array.dtype.name, "shape": list(array.shape)}
    return spec, memoryview(array.reshape(-1).view(np.uint8))


def _pack(kind: str, fields: dict[str, Any], buffers: list[tuple[dict[str, Any], memoryview]]):
    header = {"kind": kind, "v": SCHEMA_VERSION, **fields, "buffers": [s for s, _ in buffers]}
    return [_dump_json(header), *(view for _, view in buffers)]


def _check_image(image: np.ndarray, size: tuple[int, int] | None, where: str) -> None:
    _require(
        image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3,
        f"{where}: image must be HxWx3 uint8, got {image.dtype} {image.shape}",
    )
    _require(
        size is None or tuple(image.shape[:2]) == tuple(size),
        f"{where}: image is {image.shape[0]}x{image.shape[1]} but the size says {size}",
    )


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FrameMeta:
    """Identity and timing of one video frame, carried by every per-frame message.

    ``pts`` is the decoder's repaired timestamp, strictly increasing within a stream;
    ``source_pts`` is the container's pts where the repair changed it (None otherwise), so a
    frame can still be found in the original file by the timestamp a player shows.
    """

    stream_id: str
    seq: int  # 0, 1, 2, ... per stream: a gap means messages were lost
    frame_index: int
    pts: int | None
    time_base: tuple[int, int]  # (numerator, denominator)
    capture_time: float  # time.time() when the frame was decoded / captured
    # The source's connection number: 0, then +1 at every reconnect of a live source. A
    # change tells the tracker that the camera was gone for a while in between.
    session: int = 0
    # Optional: headers of senders from before the timestamp repair have none.
    source_pts: int | None = None

    def __post_init__(self) -> None:
        _require(self.time_base[1] > 0, f"time_base {self.time_base} needs a positive denominator")
        _require(self.session >= 0, f"session must be >= 0, got {self.session}")

    @property
    def time_seconds(self) -> float | None:
        """Presentation time in seconds (pts * time_base), or None without a pts."""
        if self.pts is None:
            return None
        return self.pts * self.time_base[0] / self.time_base[1]

    def to_json(self) -> dict[str, Any]:
        # Not msgspec.to_builtins: it skips defaults that msgspec's decoding left to the class.
        fields = dataclasses.asdict(self)
        if self.source_pts is None:  # only repaired frames carry it: headers stay small
            del fields["source_pts"]
        return fields

    @classmethod
    def from_json(cls, header: Mapping[str, Any]) -> FrameMeta:
        """The ``meta`` of a parsed header; raises MessageError naming a wrong field."""
        try:
            return msgspec.convert(header.get("meta"), cls)
        except msgspec.ValidationError as err:
            raise MessageError(_explain(err, "meta")) from None


@dataclass(frozen=True)
class TrackRecord:
    """One tracked object in one frame; ``box`` is (x1, y1, x2, y2) in pixels."""

    track_id: int
    box: Box
    score: float
    state: TrackState
    frames_since_update: int
    innovation: float

    def __post_init__(self) -> None:
        _require(self.state in TRACK_STATES, f"track state {self.state!r} not in {TRACK_STATES}")
        _require(len(self.box) == 4, f"track box needs 4 numbers, got {self.box}")
        numbers = (*self.box, self.score, self.innovation)
        # Headers are standard JSON, which has no NaN / Infinity.
        _require(
            all(math.isfinite(x) for x in numbers), f"track {self.track_id}: non-finite number"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrackListing(TypedDict):
    """One row of a "list" reply: a track, or a prompt waiting for its start frame;
    ``pending`` for a prompt or correction that no frame has run yet."""

    track_id: int
    state: TrackState
    box: Annotated[list[float], msgspec.Meta(min_length=4, max_length=4)] | None
    score: float
    frames_since_update: int
    pending: bool
    start_frame: int | None


# ----------------------------------------------------------------------------- headers
# What part 0 of each kind holds, checked by msgspec as it is parsed. Unknown fields pass
# (readers ignore them); the buffer checks that JSON cannot express follow in the messages.


class BufferSpec(msgspec.Struct):
    """One raw buffer: the part after the previous one, ``prod(shape) * itemsize`` bytes."""

    name: str
    dtype: RawDtype
    shape: list[NonNegativeInt]
    # No encoding is defined: a reader refuses a buffer that names one rather than misread it.
    encoding: None = None


class _Envelope(msgspec.Struct):
    """What every header holds, read first: the version and kind decide the rest."""

    kind: str
    v: int


class _Header(msgspec.Struct, tag_field="kind", kw_only=True):
    """What every header holds beside its fields: ``kind`` (the tag) and ``v``."""

    v: Literal[2]  # SCHEMA_VERSION, which _Envelope has checked already


class FrameHeader(_Header, tag="frame", kw_only=True):
    """Part 0 of a "frame" message; buffers: image."""

    meta: FrameMeta
    timings: dict[str, float] = {}
    buffers: list[BufferSpec]


class EmbeddingHeader(_Header, tag="embedding", kw_only=True):
    """Part 0 of an "embedding" message; buffers: embedding, then optionally image."""

    meta: FrameMeta
    embedding_dtype: EmbeddingDtype
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    timings: dict[str, float] = {}
    buffers: list[BufferSpec]


class MasksHeader(_Header, tag="masks", kw_only=True):
    """Part 0 of a "masks" message; buffers: masks (the windows' bits), then optionally image."""

    meta: FrameMeta
    frame_size: tuple[PositiveInt, PositiveInt]
    tracks: list[TrackRecord]
    mask_windows: list[tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt]]
    timings: dict[str, float] = {}
    buffers: list[BufferSpec]


_NoBuffers = Annotated[list[BufferSpec], msgspec.Meta(max_length=0)]


class StatusHeader(_Header, tag="status", kw_only=True):
    """Part 0 (and the only part) of a "status" message."""

    node: str
    state: StatusState
    time: float
    counters: dict[str, int] = {}
    detail: dict[str, Any] = {}
    buffers: _NoBuffers = []


class EndHeader(_Header, tag="end", kw_only=True):
    """Part 0 (and the only part) of an "end" message."""

    stream_id: str
    frames: int
    reason: str
    buffers: _NoBuffers = []


Header = FrameHeader | EmbeddingHeader | MasksHeader | StatusHeader | EndHeader
_HEADERS: dict[str, type[_Header]] = {h.__struct_config__.tag: h for h in get_args(Header)}


def _decode_buffers(
    kind: str, specs: list[BufferSpec], frames: Sequence[Part], layouts: list[list[str]]
) -> dict[str, np.ndarray]:
    """The buffers of a message whose buffer names must be one of ``layouts``."""
    _require(
        len(frames) == 1 + len(specs),
        f"message has {len(frames)} part(s) but its header lists {len(specs)} buffer(s)"
        f" (expected {1 + len(specs)} parts)",
    )
    arrays = {}
    for i, spec in enumerate(specs):
        view = _byte_view(frames[i + 1], f"part {i + 1}")
        dtype = _RAW_DTYPES[spec.dtype]
        expected = math.prod(spec.shape) * dtype.itemsize
        _require(
            view.nbytes == expected,
            f"buffer '{spec.name}': {view.nbytes} bytes do not match {spec.dtype}"
            f" {spec.shape} ({expected} bytes)",
        )
        arrays[spec.name] = np.frombuffer(view, dtype).reshape(spec.shape)
    names = [spec.name for spec in specs]
    _require(names in layouts, f"'{kind}' buffers must be one of {layouts}, got {names}")
    return arrays


def _header_of(frames: Sequence[Part]) -> tuple[str, memoryview]:
    """The kind of a message and its part 0, after the version check."""
    _require(len(frames) > 0, "empty message: no header part")
    view = _byte_view(frames[0], "header (part 0)")
    envelope = _decode(_Envelope, view, "header")
    _require(
        envelope.v == SCHEMA_VERSION,
        f"schema version {envelope.v} is not supported (this reader knows {SCHEMA_VERSION})",
    )
    return envelope.kind, view


# ----------------------------------------------------------------------------- messages

_M = TypeVar("_M", bound="_WireMessage")


class _WireMessage:
    """Shared ``from_frames``; subclasses set ``kind`` (their header's tag) and the hooks."""

    kind: ClassVar[str]

    def to_frames(self) -> list[bytes | memoryview]:
        """Header then buffers, ready for ``send_multipart(copy=False)`` (no array copy)."""
        raise NotImplementedError

    @classmethod
    def _from_header(cls: type[_M], header: Any, frames: Sequence[Part]) -> _M:
        raise NotImplementedError

    @classmethod
    def _parse(cls: type[_M], view: memoryview, frames: Sequence[Part]) -> _M:
        return cls._from_header(_decode(_HEADERS[cls.kind], view, "header"), frames)

    @classmethod
    def from_frames(cls: type[_M], frames: Sequence[Part]) -> _M:
        """Rebuild the message from its parts; raises MessageError saying what is wrong."""
        kind, view = _header_of(frames)
        _require(kind == cls.kind, f"expected a '{cls.kind}' message, got kind {kind!r}")
        return cls._parse(view, frames)


@dataclass(frozen=True)
class FrameMessage(_WireMessage):
    """A decoded frame: ``image`` is HxWx3 uint8 RGB; ``timings``: stage -> milliseconds."""

    kind: ClassVar[str] = "frame"

    meta: FrameMeta
    image: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_image(self.image, None, "frame")

    def to_frames(self) -> list[bytes | memoryview]:
        fields = {"meta": self.meta.to_json(), "timings": self.timings}
        return _pack(self.kind, fields, [_raw_buffer("image", self.image)])

    @classmethod
    def _from_header(cls, header: FrameHeader, frames: Sequence[Part]) -> FrameMessage:
        arrays = _decode_buffers(cls.kind, header.buffers, frames, [["image"]])
        return cls(meta=header.meta, image=arrays["image"], timings=header.timings)


@dataclass(frozen=True)
class EmbeddingMessage(_WireMessage):
    """The image encoder's output for one frame.

    ``embedding`` is C x h x w: float16 or float32, or uint16 holding bfloat16 bit patterns
    when ``embedding_dtype == "bfloat16"``. ``original_size`` is the frame's (H, W),
    ``input_size`` the (H, W) after the longest-side resize, before padding. ``image`` (HxWx3
    uint8) rides along when a later node needs the frame. ``timings``: stage -> milliseconds.
    """

    kind: ClassVar[str] = "embedding"

    meta: FrameMeta
    embedding: np.ndarray
    embedding_dtype: EmbeddingDtype
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        wire = _EMBEDDING_WIRE_DTYPE.get(self.embedding_dtype)
        _require(
            wire is not None,
            f"embedding_dtype {self.embedding_dtype!r} is not one of {list(_EMBEDDING_WIRE_DTYPE)}",
        )
        _require(
            self.embedding.ndim == 3 and self.embedding.dtype.name == wire,
            f"embedding must be a CxHxW {wire} array for embedding_dtype"
            f" {self.embedding_dtype!r}, got {self.embedding.dtype} {self.embedding.shape}",
        )
        if self.image is not None:
            _check_image(self.image, self.original_size, "embedding")

    def to_frames(self) -> list[bytes | memoryview]:
        buffers = [_raw_buffer("embedding", self.embedding)]
        if self.image is not None:
            buffers.append(_raw_buffer("image", self.image))
        fields = {
            "meta": self.meta.to_json(),
            "embedding_dtype": self.embedding_dtype,
            "original_size": list(self.original_size),
            "input_size": list(self.input_size),
            "timings": self.timings,
        }
        return _pack(self.kind, fields, buffers)

    @classmethod
    def _from_header(cls, header: EmbeddingHeader, frames: Sequence[Part]) -> EmbeddingMessage:
        layouts = [["embedding"], ["embedding", "image"]]
        arrays = _decode_buffers(cls.kind, header.buffers, frames, layouts)
        return cls(
            meta=header.meta,
            embedding=arrays["embedding"],
            embedding_dtype=header.embedding_dtype,
            original_size=header.original_size,
            input_size=header.input_size,
            image=arrays.get("image"),
            timings=header.timings,
        )


@dataclass(frozen=True)
class MaskMessage(_WireMessage):
    """The tracker's result for one frame.

    ``masks``: N RegionMask of ``frame_size`` with N == len(tracks) (mask i belongs to
    tracks[i]; N may be 0). An (N, H, W) bool array is accepted too and cut into tight
    windows. On the wire each mask travels as its window and the window's bits (module
    docs); ``dense_masks()`` gives the (N, H, W) array.
    """

    kind: ClassVar[str] = "masks"

    meta: FrameMeta
    frame_size: tuple[int, int]
    tracks: tuple[TrackRecord, ...]
    masks: tuple[RegionMask, ...]
    image: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = tuple(self.frame_size)
        _require(
            len(size) == 2
            and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size
            ),
            f"frame_size must be [H, W] positive integers, got {list(size)}",
        )
        frame_size = (int(size[0]), int(size[1]))
        try:
            masks = as_region_masks(self.masks, frame_size)
        except ValueError as err:
            raise MessageError(f"masks: {err}") from None
        _require(
            len(masks) == len(self.tracks),
            f"{len(masks)} masks for {len(self.tracks)} tracks: one mask per track",
        )
        object.__setattr__(self, "frame_size", frame_size)
        object.__setattr__(self, "masks", masks)
        if self.image is not None:
            _check_image(self.image, self.frame_size, "masks")

    def dense_masks(self) -> np.ndarray:
        """(N, H, W) bool: every track's mask over the whole frame."""
        return stack_dense(self.masks, (self.frame_size[0], self.frame_size[1]))

    def to_frames(self) -> list[bytes | memoryview]:
        packed = [np.packbits(m.window.reshape(-1), bitorder="big") for m in self.masks]
        bits = np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8)
        buffers = [_raw_buffer("masks", bits)]
        if self.image is not None:
            buffers.append(_raw_buffer("image", self.image))
        fields = {
            "meta": self.meta.to_json(),
            "frame_size": list(self.frame_size),
            "tracks": [track.to_json() for track in self.tracks],
            "mask_windows": [list(m.box) for m in self.masks],
            "timings": self.timings,
        }
        return _pack(self.kind, fields, buffers)

    @classmethod
    def _from_header(cls, header: MasksHeader, frames: Sequence[Part]) -> MaskMessage:
        arrays = _decode_buffers(cls.kind, header.buffers, frames, [["masks"], ["masks", "image"]])
        return cls(
            meta=header.meta,
            frame_size=header.frame_size,
            tracks=tuple(header.tracks),
            masks=_unpack_windows(header, arrays["masks"]),
            image=arrays.get("image"),
            timings=header.timings,
        )


def _unpack_windows(header: MasksHeader, bits: np.ndarray) -> tuple[RegionMask, ...]:
    """The RegionMasks of a masks message: ``mask_windows`` and the ``masks`` buffer."""
    height, width = header.frame_size
    windows, count = header.mask_windows, len(header.tracks)
    _require(
        len(windows) == count,
        f"header: {len(windows)} mask_windows for {count} tracks (one window per track)",
    )
    _require(
        bits.dtype == np.uint8 and bits.ndim == 1,
        f"buffer 'masks' must be uint8 [bytes], got {bits.dtype} {list(bits.shape)}",
    )
    for i, (x1, y1, x2, y2) in enumerate(windows):
        _require(
            x1 <= x2 <= width and y1 <= y2 <= height,
            f"header: mask_windows[{i}] {list(windows[i])} does not lie in the {width}x{height}"
            " frame",
        )
    sizes = [(y2 - y1) * (x2 - x1) for x1, y1, x2, y2 in windows]
    expected = sum((size + 7) // 8 for size in sizes)
    _require(
        bits.size == expected,
        f"buffer 'masks': {bits.size} bytes, but the mask_windows' bits take {expected}",
    )
    masks, start = [], 0
    for i, (box, size) in enumerate(zip(windows, sizes, strict=True)):
        stop = start + (size + 7) // 8
        chunk = bits[start:stop]
        spare = -size % 8
        _require(
            spare == 0 or int(chunk[-1]) & ((1 << spare) - 1) == 0,
            f"buffer 'masks': the unused bits after window {i} must be zero",
        )
        x1, y1, x2, y2 = box
        window = np.unpackbits(chunk, count=size, bitorder="big").view(np.bool_)
        masks.append(RegionMask(header.frame_size, box, window.reshape(y2 - y1, x2 - x1)))
        start = stop
    return tuple(masks)


class _HeaderOnlyMessage(_WireMessage):
    """A message that is its header alone: its dataclass fields, the same-named header
    fields, no buffers."""

    def to_frames(self) -> list[bytes | memoryview]:
        return _pack(self.kind, vars(self), [])  # its fields: kind is a ClassVar

    @classmethod
    def _from_header(cls: type[_M], header: Any, frames: Sequence[Part]) -> _M:
        _require(len(frames) == 1, f"'{cls.kind}' message must have 1 part, got {len(frames)}")
        return cls(**{f.name: getattr(header, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class StatusMessage(_HeaderOnlyMessage):
    """A node's heartbeat: ``state`` (one of STATUS_STATES, module docs), wall-clock
    ``time``, counters and JSON-able ``detail``."""

    kind: ClassVar[str] = "status"

    node: str
    state: StatusState
    time: float
    counters: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked at the sender too: a state no reader knows is refused where it is made.
        _require(self.state in STATUS_STATES, f"status state {self.state!r} not in {STATUS_STATES}")


@dataclass(frozen=True)
class EndOfStream(_HeaderOnlyMessage):
    """A stream ended after ``frames`` frames; ``reason``: "eof", "max_frames",
    "error: ...", "stopped"."""

    kind: ClassVar[str] = "end"

    stream_id: str
    frames: int
    reason: str


Message = FrameMessage | EmbeddingMessage | MaskMessage | StatusMessage | EndOfStream

_KINDS: dict[str, type[_WireMessage]] = {cls.kind: cls for cls in get_args(Message)}


def encode(msg: Message) -> list[bytes | memoryview]:
    """The parts of ``msg`` for ``send_multipart(copy=False)``."""
    if not isinstance(msg, _WireMessage):
        raise TypeError(f"not a pipeline message: {type(msg).__name__}")
    return msg.to_frames()


def decode(frames: Sequence[Part]) -> Message:
    """The message in ``frames``, whatever its kind; raises MessageError when malformed."""
    kind, view = _header_of(frames)
    cls = _KINDS.get(kind)
    _require(cls is not None, f"unknown message kind {kind!r} (known: {sorted(_KINDS)})")
    return cls._parse(view, frames)


# ----------------------------------------------------------------------------- prompts


_C = TypeVar("_C", bound="_ControlMessage")


class _ControlMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One JSON part on the control socket. Unknown fields are refused there: a typo
    ("bbox") must not silently become an absent field ("no box")."""

    _what: ClassVar[str]

    def to_json(self) -> bytes:
        return _dump_json(msgspec.structs.asdict(self))

    @classmethod
    def from_json(cls: type[_C], data: bytes | str) -> _C:
        """Parse one; raises MessageError on bad JSON, unknown fields or wrong values."""
        return _decode(cls, data, cls._what)


class PromptCommand(_ControlMessage):
    """A run-time prompt request on the control socket.

    ``op``: "add" (needs box or points), "update" (needs track_id and box; points are
    refused: a correction restarts the track at a box, and a new points prompt is an "add",
    after a "remove" under the same track_id if need be), "remove" (needs track_id), "list".
    ``points`` are (x, y) pixels with one SAM label each in ``labels`` (1 foreground, 0
    background). ``frame``: "add" only, start the object at this frame index (None: the next
    frame). Whether boxes lie inside the frame is the tracker's check.
    """

    _what: ClassVar[str] = "prompt command"

    op: PromptOp
    track_id: int | None = None
    box: Box | None = None
    points: tuple[tuple[float, float], ...] | None = None
    labels: tuple[int, ...] | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        _require(self.op in PROMPT_OPS, f"prompt op {self.op!r} is not one of {PROMPT_OPS}")
        has_prompt = self.box is not None or self.points is not None
        if self.op in ("update", "remove"):
            _require(self.track_id is not None, f"prompt op '{self.op}' needs a track_id")
        if self.op == "add":
            _require(has_prompt, "prompt op 'add' needs a box or points")
        if self.op == "update":  # a correction restarts the track at a box
            _require(
                self.box is not None and self.points is None,
                "prompt op 'update' needs a box and takes no points (to prompt with points: "
                "remove, then add with the same track_id)",
            )
        no_frame = f"prompt op '{self.op}' takes no frame: only an add waits for one"
        _require(self.frame is None or self.op == "add", no_frame)
        if self.labels is not None:
            _require(
                self.points is not None and len(self.labels) == len(self.points),
                "prompt labels need points, one label per point",
            )


class PromptReply(_ControlMessage):
    """The control socket's answer: ``ok`` (the command is checked and queued) or an
    ``error`` sentence (nothing changed); the new or affected ``track_id``; ``frame``, the
    first frame index the command changes (for "list": the one the listing leads into);
    ``tracks``, every track and prompt (TrackListing dicts) with the command applied."""

    _what: ClassVar[str] = "prompt reply"

    ok: bool
    error: str | None = None
    track_id: int | None = None
    frame: NonNegativeInt | None = None
    tracks: tuple[TrackListing, ...] = ()


def wire_schema() -> dict[str, Any]:
    """The wire format as a JSON Schema (draft 2020-12), for consumers in other languages:
    the root validates part 0 of a data message; a prompt request, ``#/$defs/PromptCommand``;
    a reply, ``#/$defs/PromptReply``. Made of the types the readers check with, so it cannot
    drift from them; what it cannot say (byte lengths, window bits) is in the module docs."""
    (headers, _, _), defs = msgspec.json.schema_components(
        (Header, PromptCommand, PromptReply), ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"samstream wire format, schema version {SCHEMA_VERSION}",
        **headers,
        "$defs": defs,
    }


if __name__ == "__main__":  # python -m pipeline.wire.messages > wire-schema.json
    print(json.dumps(wire_schema(), indent=2))
