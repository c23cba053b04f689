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
Its part is exactly ``prod(shape) * itemsize`` bytes. A kind's buffers come in the order
listed below; the optional ones come last, and a message without them simply ends earlier.

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
- ``"end"``: ``stream_id`` str, ``frames`` int, ``reason`` str: the decoder sends "eof" (the
  source ended) or "max_frames" (``decoder.max_frames`` reached), and the nodes pass it on.
  No buffers. A stream that is stopped or fails gets no end message: the nodes' statuses
  say "stopped" or "failed" instead.

A status ``state`` is one of (STATUS_STATES): "starting" (setting up, models loading),
"running", "over_budget" (live publisher: frames over the per-frame budget since the last
status), "stalled" / "lost" / "reconnecting" (decoder: the live source is silent, gone,
being reconnected; SOURCE_STATES), "degraded" (sent by the launcher: a node died and is
being restarted), "done" (the stream ended), "stopped" (a stop request), "failed"
(``detail["error"]`` says why).

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

import json
import math
import typing
from collections.abc import Sequence
from enum import Enum
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Self, TypedDict, get_args

import msgspec
import numpy as np

from pipeline.wire.buffers import (
    IMAGE,
    BufferSpec,
    MaskWindows,
    MessageError,
    NonNegativeInt,
    Part,
    Raw,
    byte_view,
    decode_buffers,
    raw_buffer,
    require,
)
from pipeline.wire.masks import RegionMask, as_region_masks, frame_size_of, stack_dense

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


# A live source's states (`pipeline.video.live_source`, one definition): while "connected"
# the decoder's status is "running"; the others are decoder status states of their own.
SourceOutage = Literal["stalled", "lost", "reconnecting"]
SourceState = Literal["connected", SourceOutage]
StatusState = Literal[
    "starting", "running", "over_budget", SourceOutage, "degraded", "done", "stopped", "failed"
]
PromptOp = Literal["add", "update", "remove", "list"]
EmbeddingDtype = Literal["float16", "bfloat16", "float32"]
TRACK_STATES: tuple[str, ...] = tuple(state.value for state in TrackState)
SOURCE_STATES: tuple[str, ...] = get_args(SourceState)
STATUS_STATES: tuple[str, ...] = get_args(StatusState)
PROMPT_OPS: tuple[str, ...] = get_args(PromptOp)

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Box = tuple[float, float, float, float]

# embedding_dtype -> dtype name of the array that carries it (numpy has no bfloat16).
_EMBEDDING_WIRE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


# ----------------------------------------------------------------------------- helpers


@cache
def _left_out_when_none(cls: type[msgspec.Struct]) -> frozenset[str]:
    """The optional fields (default None) of a header record: absent, not null, while None."""
    return frozenset(f.name for f in msgspec.structs.fields(cls) if f.default is None)


def _json_default(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):  # FrameMeta, TrackRecord: their fields, in order
        skip = _left_out_when_none(type(value))
        items = zip(value.__struct_fields__, msgspec.structs.astuple(value), strict=True)
        return {name: v for name, v in items if v is not None or name not in skip}
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


def _decode(kind: Any, data: Part | str, what: str) -> Any:
    """``data`` parsed and checked as ``kind``; whatever is wrong is a MessageError in
    msgspec's words after ``what`` ("header: Expected `int`, got `str` - at `$.meta.seq`")."""
    text = data if isinstance(data, str) else byte_view(data, what)
    size, unit = (len(text), "characters") if isinstance(text, str) else (text.nbytes, "bytes")
    # Checked before parsing: what a hostile peer sends costs no more than this.
    require(size <= MAX_HEADER_BYTES, f"{what} is {size} {unit}, more than {MAX_HEADER_BYTES}")
    try:
        return msgspec.json.decode(text, type=kind)
    # Wrong types or values, missing fields, huge integers, bad JSON or UTF-8, NaN, nesting
    # deeper than Python's recursion limit.
    except (msgspec.MsgspecError, RecursionError) as err:
        raise MessageError(f"{what}: {err}") from None


def _check_size(kind: str, image: np.ndarray | None, size: tuple[int, int]) -> None:
    if image is not None and tuple(image.shape[:2]) != tuple(size):
        raise MessageError(
            f"{kind}: image is {image.shape[0]}x{image.shape[1]} but the size says {size}"
        )


# ----------------------------------------------------------------------------- records
# The header's own types: msgspec checks them as it parses, and decoding gives them directly.


class FrameMeta(msgspec.Struct, frozen=True):
    """Identity and timing of one video frame, carried by every per-frame message.

    ``pts`` is the decoder's repaired timestamp, strictly increasing within a stream;
    ``source_pts`` is the container's pts where the repair changed it (None otherwise), so a
    frame can still be found in the original file by the timestamp a player shows.
    """

    # A changed copy is msgspec.structs.replace(meta, seq=...): its checks run again.

    stream_id: str
    seq: int  # 0, 1, 2, ... per stream: a gap means messages were lost
    frame_index: int
    pts: int | None
    time_base: tuple[int, int]  # (numerator, denominator)
    capture_time: float  # time.time() when the frame was decoded / captured
    # The source's connection number: 0, then +1 at every reconnect of a live source. A
    # change tells the tracker that the camera was gone for a while in between.
    session: int = 0
    # Optional, and left out of the header while None: only repaired frames carry it, and
    # headers of senders from before the timestamp repair have none.
    source_pts: int | None = None

    def __post_init__(self) -> None:
        require(self.time_base[1] > 0, f"time_base {self.time_base} needs a positive denominator")
        require(self.session >= 0, f"session must be >= 0, got {self.session}")

    @property
    def time_seconds(self) -> float | None:
        """Presentation time in seconds (pts * time_base), or None without a pts."""
        if self.pts is None:
            return None
        return self.pts * self.time_base[0] / self.time_base[1]


class TrackRecord(msgspec.Struct, frozen=True):
    """One tracked object in one frame; ``box`` is (x1, y1, x2, y2) in pixels."""

    track_id: int
    box: Box
    score: float
    state: TrackState
    frames_since_update: int
    innovation: float

    def __post_init__(self) -> None:
        require(self.state in TRACK_STATES, f"track state {self.state!r} not in {TRACK_STATES}")
        require(len(self.box) == 4, f"track box needs 4 numbers, got {self.box}")
        numbers = (*self.box, self.score, self.innovation)
        # Headers are standard JSON, which has no NaN / Infinity.
        require(all(math.isfinite(x) for x in numbers), f"track {self.track_id}: non-finite number")


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


# ----------------------------------------------------------------------------- messages


class _Envelope(msgspec.Struct):
    """What every header holds, read first: the version and kind decide the rest."""

    kind: str
    v: int


class _Header(msgspec.Struct, tag_field="kind", kw_only=True):
    """What every header holds beside its fields: ``kind`` (the tag) and ``v``."""

    v: Literal[2]  # SCHEMA_VERSION, which _Envelope has checked already


_NoBuffers = Annotated[list[BufferSpec], msgspec.Meta(max_length=0)]


@cache
def _buffers(cls: type[_WireMessage]) -> dict[str, Raw]:
    """The fields of ``cls`` that travel as buffers, in order, and how."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {
        name: codec
        for name in cls.__struct_fields__
        for codec in getattr(hints[name], "__metadata__", ())
        if isinstance(codec, Raw)
    }


@cache
def header_type(cls: type[_WireMessage]) -> type[msgspec.Struct]:
    """The Struct that part 0 of a ``cls`` message is parsed and checked as (and the JSON
    Schema is made of): the fields of ``cls`` that are not buffers, what its buffers add
    (``mask_windows``), and the buffer specs. Unknown fields pass: readers ignore them."""
    hints = typing.get_type_hints(cls, include_extras=True)
    buffers = _buffers(cls)
    fields: list[tuple[Any, ...]] = []
    for f in msgspec.structs.fields(cls):
        if f.name in buffers:
            fields += buffers[f.name].header_fields
        else:
            default = msgspec.field(default=f.default, default_factory=f.default_factory)
            fields.append((f.name, hints[f.name], default))
    # A kind without buffers may leave out its empty list.
    fields.append(("buffers", list[BufferSpec]) if buffers else ("buffers", _NoBuffers, []))
    name = f"{cls.kind.capitalize()}Header"  # FrameHeader, ..., EndHeader
    header = msgspec.defstruct(name, fields, bases=(_Header,), tag=cls.kind, kw_only=True)
    header.__module__ = __name__
    header.__doc__ = f'Part 0 of a "{cls.kind}" message ({cls.__name__}, pipeline.wire.messages).'
    return header


def _header_of(frames: Sequence[Part]) -> tuple[str, memoryview]:
    """The kind of a message and its part 0, after the version check."""
    require(len(frames) > 0, "empty message: no header part")
    view = byte_view(frames[0], "header (part 0)")
    envelope = _decode(_Envelope, view, "header")
    require(
        envelope.v == SCHEMA_VERSION,
        f"schema version {envelope.v} is not supported (this reader knows {SCHEMA_VERSION})",
    )
    return envelope.kind, view


class _WireMessage(msgspec.Struct, frozen=True):
    """One message kind, the whole of its definition: ``kind``, then its fields in header
    order, those declared with a codec (`Raw`, `MaskWindows`) sent as the buffer parts in
    the same order (an optional one defaults to None, after the required ones). Encoding,
    decoding and the header's type (`header_type`) follow from the declaration."""

    kind: ClassVar[str]

    def __post_init__(self) -> None:
        for name, codec in _buffers(type(self)).items():
            if (value := getattr(self, name)) is not None:
                codec.check(self.kind, name, value)

    def to_frames(self) -> list[bytes | memoryview]:
        """Header then buffers, ready for ``send_multipart(copy=False)`` (no array copy)."""
        buffers = _buffers(type(self))
        header: dict[str, Any] = {"kind": self.kind, "v": SCHEMA_VERSION}
        specs, views = [], []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name not in buffers:
                header[name] = value
            elif value is not None:
                fields, array = buffers[name].to_wire(value)
                header.update(fields)
                spec, view = raw_buffer(name, array)
                specs.append(spec)
                views.append(view)
        header["buffers"] = specs
        return [_dump_json(header), *views]

    @classmethod
    def _parse(cls, view: memoryview, frames: Sequence[Part]) -> Self:
        header = _decode(header_type(cls), view, "header")
        arrays, buffers = decode_buffers(header.buffers, frames), _buffers(cls)
        # The required buffers in order, then the optional ones, each needing those before it.
        names, declared = [spec.name for spec in header.buffers], list(buffers)
        required = sum(f.required for f in msgspec.structs.fields(cls) if f.name in declared)
        layouts = [declared[:n] for n in range(required, len(declared) + 1)]
        require(names in layouts, f"'{cls.kind}' buffers must be one of {layouts}, got {names}")
        values = {n: getattr(header, n) for n in cls.__struct_fields__ if n not in buffers}
        for name, codec in buffers.items():
            if name in arrays:  # an optional buffer left out keeps its default, None
                values[name] = codec.from_wire(arrays[name], header)
        return cls(**values)

    @classmethod
    def from_frames(cls, frames: Sequence[Part]) -> Self:
        """Rebuild the message from its parts; raises MessageError saying what is wrong."""
        kind, view = _header_of(frames)
        require(kind == cls.kind, f"expected a '{cls.kind}' message, got kind {kind!r}")
        return cls._parse(view, frames)


class FrameMessage(_WireMessage):
    """A decoded frame: ``image`` is HxWx3 uint8 RGB; ``timings``: stage -> milliseconds."""

    kind: ClassVar[str] = "frame"

    meta: FrameMeta
    image: Annotated[np.ndarray, IMAGE]
    timings: dict[str, float] = {}


class EmbeddingMessage(_WireMessage):
    """The image encoder's output for one frame.

    ``embedding`` is C x h x w: float16 or float32, or uint16 holding bfloat16 bit patterns
    when ``embedding_dtype == "bfloat16"``. ``original_size`` is the frame's (H, W),
    ``input_size`` the (H, W) after the longest-side resize, before padding. ``image`` (HxWx3
    uint8) rides along when a later node needs the frame. ``timings``: stage -> milliseconds.
    """

    kind: ClassVar[str] = "embedding"

    meta: FrameMeta
    embedding: Annotated[np.ndarray, Raw("CxHxW", *_EMBEDDING_WIRE_DTYPE.values())]
    embedding_dtype: EmbeddingDtype
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image: Annotated[np.ndarray | None, IMAGE] = None
    timings: dict[str, float] = {}

    def __post_init__(self) -> None:
        wire = _EMBEDDING_WIRE_DTYPE.get(self.embedding_dtype)
        require(
            wire is not None,
            f"embedding_dtype {self.embedding_dtype!r} is not one of {list(_EMBEDDING_WIRE_DTYPE)}",
        )
        super().__post_init__()
        require(
            self.embedding.dtype.name == wire,
            f"embedding must be a CxHxW {wire} array for embedding_dtype"
            f" {self.embedding_dtype!r}, got {self.embedding.dtype} {self.embedding.shape}",
        )
        _check_size(self.kind, self.image, self.original_size)


class MaskMessage(_WireMessage):
    """The tracker's result for one frame.

    ``masks``: N RegionMask of ``frame_size`` with N == len(tracks) (mask i belongs to
    tracks[i]; N may be 0). An (N, H, W) bool array is accepted too and cut into tight
    windows. On the wire each mask travels as its window and the window's bits (module
    docs); ``dense_masks()`` gives the (N, H, W) array.
    """

    kind: ClassVar[str] = "masks"

    meta: FrameMeta
    frame_size: tuple[PositiveInt, PositiveInt]
    tracks: tuple[TrackRecord, ...]
    masks: Annotated[tuple[RegionMask, ...], MaskWindows()]
    image: Annotated[np.ndarray | None, IMAGE] = None
    timings: dict[str, float] = {}

    def __post_init__(self) -> None:
        try:
            frame_size = frame_size_of(self.frame_size)
            masks = as_region_masks(self.masks, frame_size)
        except ValueError as err:
            raise MessageError(f"{self.kind}: {err}") from None
        require(
            len(masks) == len(self.tracks),
            f"{len(masks)} masks for {len(self.tracks)} tracks: one mask per track",
        )
        msgspec.structs.force_setattr(self, "frame_size", frame_size)
        msgspec.structs.force_setattr(self, "masks", masks)
        super().__post_init__()
        _check_size(self.kind, self.image, frame_size)

    def dense_masks(self) -> np.ndarray:
        """(N, H, W) bool: every track's mask over the whole frame."""
        return stack_dense(self.masks, self.frame_size)


class StatusMessage(_WireMessage):
    """A node's heartbeat: ``state`` (one of STATUS_STATES, module docs), wall-clock
    ``time``, counters and JSON-able ``detail``."""

    kind: ClassVar[str] = "status"

    node: str
    state: StatusState
    time: float
    counters: dict[str, int] = {}
    detail: dict[str, Any] = {}

    def __post_init__(self) -> None:
        # Checked at the sender too: a state no reader knows is refused where it is made.
        require(self.state in STATUS_STATES, f"status state {self.state!r} not in {STATUS_STATES}")


class EndOfStream(_WireMessage):
    """A stream ended after ``frames`` frames; ``reason``: "eof" (the source ended) or
    "max_frames" (``decoder.max_frames`` reached), the decoder's two (module docs)."""

    kind: ClassVar[str] = "end"

    stream_id: str
    frames: int
    reason: str


Message = FrameMessage | EmbeddingMessage | MaskMessage | StatusMessage | EndOfStream

_KINDS: dict[str, type[_WireMessage]] = {cls.kind: cls for cls in get_args(Message)}
# What part 0 of a data message may be: the header types of every kind (the JSON Schema's).
Header = typing.Union[tuple(header_type(cls) for cls in _KINDS.values())]  # noqa: UP007


def encode(msg: Message) -> list[bytes | memoryview]:
    """The parts of ``msg`` for ``send_multipart(copy=False)``."""
    if not isinstance(msg, _WireMessage):
        raise TypeError(f"not a pipeline message: {type(msg).__name__}")
    return msg.to_frames()


def decode(frames: Sequence[Part]) -> Message:
    """The message in ``frames``, whatever its kind; raises MessageError when malformed."""
    kind, view = _header_of(frames)
    cls = _KINDS.get(kind)
    require(cls is not None, f"unknown message kind {kind!r} (known: {sorted(_KINDS)})")
    return cls._parse(view, frames)


# ----------------------------------------------------------------------------- prompts


class _ControlMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One JSON part on the control socket. Unknown fields are refused there: a typo
    ("bbox") must not silently become an absent field ("no box")."""

    _what: ClassVar[str]

    def to_json(self) -> bytes:
        return _dump_json(msgspec.structs.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
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
        require(self.op in PROMPT_OPS, f"prompt op {self.op!r} is not one of {PROMPT_OPS}")
        has_prompt = self.box is not None or self.points is not None
        if self.op in ("update", "remove"):
            require(self.track_id is not None, f"prompt op '{self.op}' needs a track_id")
        if self.op == "add":
            require(has_prompt, "prompt op 'add' needs a box or points")
        if self.op == "update":  # a correction restarts the track at a box
            require(
                self.box is not None and self.points is None,
                "prompt op 'update' needs a box and takes no points (to prompt with points: "
                "remove, then add with the same track_id)",
            )
        no_frame = f"prompt op '{self.op}' takes no frame: only an add waits for one"
        require(self.frame is None or self.op == "add", no_frame)
        if self.labels is not None:
            require(
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
