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
by one at every reconnect of a live source.

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
- ``"status"``: ``node`` str, ``state`` str, ``time`` float (Unix seconds), ``counters``
  {str: int}, ``detail`` {str: any JSON}. No buffers.
- ``"end"``: ``stream_id`` str, ``frames`` int, ``reason`` str ("eof", "max_frames",
  "error: ...", "stopped"). No buffers.

Readers ignore header fields they do not know. ``seq`` counts 0, 1, 2, ... per stream id, so
a consumer detects loss by gaps.

Versions: 2 sends each mask as its window (``mask_windows`` and the windows' bits), so a
message grows with the objects' areas, not with the frame's; 1 sent ``masks`` as bool
``[N, H, W]``, every track's whole frame of bits.

Prompt control (REQ/REP, one part, UTF-8 JSON)
----------------------------------------------
Request (PromptCommand): ``{"op": "add" | "update" | "remove" | "list", "track_id": int |
null, "box": [x1, y1, x2, y2] | null, "points": [[x, y], ...] | null, "labels": [int, ...] |
null, "frame": int | null}``; only ``op`` is required. Reply (PromptReply): ``{"ok": bool,
"error": str | null, "track_id": int | null, "tracks": [{...}, ...]}``.

Arrays decoded here are read-only views over the received buffers (no copy), except the
unpacked mask windows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from pipeline.masks import RegionMask, as_region_masks, stack_dense

SCHEMA_VERSION = 2

TRACK_STATES = ("tentative", "tracked", "coasting", "lost")
PROMPT_OPS = ("add", "update", "remove", "list")

# Raw buffer dtypes a reader accepts, pinned little-endian so the wire does not depend on
# the sender's byte order.
_RAW_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
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
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default).encode()
    except MessageError:
        raise
    except ValueError as exc:  # NaN / Infinity: not standard JSON, non-Python readers choke
        raise MessageError(f"header is not valid JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise MessageError(f"JSON holds {name}, which standard JSON does not allow")


MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes per track: 1 MiB is ~thousands


def _load_json(data: Part | str, what: str) -> Any:
    try:
        if isinstance(data, str):
            text = data
        else:
            view = _byte_view(data, what)
            # Checked before parsing: what a hostile peer sends costs no more than this.
            _require(
                view.nbytes <= MAX_HEADER_BYTES,
                f"{what} is {view.nbytes} bytes, more than {MAX_HEADER_BYTES}",
            )
            text = bytes(view).decode("utf-8")
        _require(
            len(text) <= MAX_HEADER_BYTES,
            f"{what} is {len(text)} characters, more than {MAX_HEADER_BYTES}",
        )
        return json.loads(text, parse_constant=_reject_constant)
    except MessageError:
        raise
    except UnicodeDecodeError as exc:
        raise MessageError(f"{what} is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise MessageError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise MessageError(f"{what} is nested too deeply to be a samstream header") from None
    except ValueError as exc:  # Python's limit on int digits ("[1" + "1" * 5000 + "]")
        raise MessageError(f"{what}: {exc}") from None


def _byte_view(part: Part, what: str) -> memoryview:
    """A flat byte view of a received part, without copying."""
    try:
        view = memoryview(getattr(part, "buffer", part))
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise MessageError(f"{what} is not a byte buffer ({type(part).__name__})") from exc


_MISSING = object()


def _typed(value: Any, kind: type, where: str) -> Any:
    """``value`` checked to be of ``kind`` (int excludes bool; float accepts int)."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    _require(ok, f"{where} must be {kind.__name__}, got {type(value).__name__}")
    return float(value) if kind is float else value


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str, *, optional: bool = False):
    """``obj[key]`` of type ``kind``; None when optional and missing or null."""
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        _require(optional, f"{where}: missing field '{key}'")
        return None
    return _typed(value, kind, f"{where}: field '{key}'")


def _numbers(value: Any, length: int | None, kind: type, where: str) -> tuple:
    """A JSON list of numbers as a tuple (of ``length`` items when given)."""
    _require(isinstance(value, list), f"{where} must be a list, got {type(value).__name__}")
    _require(length is None or len(value) == length, f"{where} must have {length} items")
    return tuple(_typed(v, kind, f"{where}[{i}]") for i, v in enumerate(value))


def _pair(obj: Mapping[str, Any], key: str, where: str) -> tuple[int, int]:
    _require(key in obj, f"{where}: missing field '{key}'")
    return _numbers(obj[key], 2, int, f"{where}: field '{key}'")


def _number_map(obj: Mapping[str, Any], key: str, kind: type, where: str) -> dict:
    """A JSON object of str -> number; missing means empty."""
    value = _field(obj, key, dict, where, optional=True) or {}
    return {k: _field(value, k, kind, f"{where}: '{key}'") for k in value}


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


def _parse_header(frames: Sequence[Part]) -> dict[str, Any]:
    _require(len(frames) > 0, "empty message: no header part")
    header = _load_json(frames[0], "header (part 0)")
    _require(isinstance(header, dict), f"header must be a JSON object, got {type(header).__name__}")
    version = _field(header, "v", int, "header")
    _require(
        version == SCHEMA_VERSION,
        f"schema version {version} is not supported (this reader knows {SCHEMA_VERSION})",
    )
    _field(header, "kind", str, "header")
    return header


def _decode_buffer(spec: Any, part: Part, index: int) -> tuple[str, np.ndarray]:
    where = f"buffer {index}"
    _require(isinstance(spec, dict), f"{where}: spec must be a JSON object")
    name = _field(spec, "name", str, where)
    where = f"buffer '{name}'"
    dtype = _field(spec, "dtype", str, where)
    shape = _numbers(spec.get("shape"), None, int, f"{where}: shape")
    _require(all(n >= 0 for n in shape), f"{where}: negative dimension in shape {list(shape)}")
    encoding = _field(spec, "encoding", str, where, optional=True)
    _require(encoding is None, f"{where}: unknown encoding {encoding!r}")
    _require(dtype in _RAW_DTYPES, f"{where}: unsupported dtype {dtype!r}")
    view = _byte_view(part, f"part {index + 1}")
    expected = math.prod(shape) * _RAW_DTYPES[dtype].itemsize
    _require(
        view.nbytes == expected,
        f"{where}: {view.nbytes} bytes do not match {dtype} {list(shape)} ({expected} bytes)",
    )
    return name, np.frombuffer(view, _RAW_DTYPES[dtype]).reshape(shape)


def _decode_buffers(
    header: dict[str, Any], frames: Sequence[Part], required: str, optional: str | None
) -> dict[str, np.ndarray]:
    """The buffers of a message whose layout is ``[required]`` or ``[required, optional]``."""
    specs = header.get("buffers")
    _require(isinstance(specs, list), "header: field 'buffers' must be a list")
    _require(
        len(frames) == 1 + len(specs),
        f"message has {len(frames)} part(s) but its header lists {len(specs)} buffer(s)"
        f" (expected {1 + len(specs)} parts)",
    )
    arrays = dict(_decode_buffer(spec, frames[i + 1], i) for i, spec in enumerate(specs))
    names = [spec["name"] for spec in specs]
    allowed = [[required]] + ([[required, optional]] if optional else [])
    _require(names in allowed, f"'{header['kind']}' buffers must be one of {allowed}, got {names}")
    return arrays


def _check_image(image: np.ndarray, size: tuple[int, int] | None, where: str) -> None:
    _require(
        image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3,
        f"{where}: image must be HxWx3 uint8, got {image.dtype} {image.shape}",
    )
    _require(
        size is None or tuple(image.shape[:2]) == tuple(size),
        f"{where}: image is {image.shape[0]}x{image.shape[1]} but the size says {size}",
    )


def _check_no_buffers(header: dict[str, Any], frames: Sequence[Part]) -> None:
    _require(header.get("buffers", []) == [], f"'{header['kind']}' carries no buffers")
    _require(len(frames) == 1, f"'{header['kind']}' message must have 1 part, got {len(frames)}")


# ----------------------------------------------------------------------------- messages

_M = TypeVar("_M", bound="_WireMessage")


class _WireMessage:
    """Shared ``from_frames``; subclasses set ``kind`` and implement the two hooks."""

    kind: ClassVar[str]

    def to_frames(self) -> list[bytes | memoryview]:
        """Header then buffers, ready for ``send_multipart(copy=False)`` (no array copy)."""
        raise NotImplementedError

    @classmethod
    def _from_header(cls: type[_M], header: dict[str, Any], frames: Sequence[Part]) -> _M:
        raise NotImplementedError

    @classmethod
    def from_frames(cls: type[_M], frames: Sequence[Part]) -> _M:
        """Rebuild the message from its parts; raises MessageError saying what is wrong."""
        header = _parse_header(frames)
        kind = header["kind"]
        _require(kind == cls.kind, f"expected a '{cls.kind}' message, got kind {kind!r}")
        return cls._from_header(header, frames)


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
        fields = {
            "stream_id": self.stream_id,
            "seq": self.seq,
            "frame_index": self.frame_index,
            "pts": self.pts,
            "time_base": list(self.time_base),
            "capture_time": self.capture_time,
            "session": self.session,
        }
        if self.source_pts is not None:  # only repaired frames carry it: headers stay small
            fields["source_pts"] = self.source_pts
        return fields

    @classmethod
    def from_json(cls, header: Mapping[str, Any]) -> FrameMeta:
        obj = _field(header, "meta", dict, "header")
        return cls(
            stream_id=_field(obj, "stream_id", str, "meta"),
            seq=_field(obj, "seq", int, "meta"),
            frame_index=_field(obj, "frame_index", int, "meta"),
            pts=_field(obj, "pts", int, "meta", optional=True),
            time_base=_pair(obj, "time_base", "meta"),
            capture_time=_field(obj, "capture_time", float, "meta"),
            session=_field(obj, "session", int, "meta", optional=True) or 0,
            # Optional: headers of senders from before the timestamp repair have none.
            source_pts=_field(obj, "source_pts", int, "meta", optional=True),
        )


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
    def _from_header(cls, header: dict[str, Any], frames: Sequence[Part]) -> FrameMessage:
        arrays = _decode_buffers(header, frames, "image", None)
        return cls(
            meta=FrameMeta.from_json(header),
            image=arrays["image"],
            timings=_number_map(header, "timings", float, "header"),
        )


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
    embedding_dtype: str
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
    def _from_header(cls, header: dict[str, Any], frames: Sequence[Part]) -> EmbeddingMessage:
        arrays = _decode_buffers(header, frames, "embedding", "image")
        return cls(
            meta=FrameMeta.from_json(header),
            embedding=arrays["embedding"],
            embedding_dtype=_field(header, "embedding_dtype", str, "header"),
            original_size=_pair(header, "original_size", "header"),
            input_size=_pair(header, "input_size", "header"),
            image=arrays.get("image"),
            timings=_number_map(header, "timings", float, "header"),
        )


@dataclass(frozen=True)
class TrackRecord:
    """One tracked object in one frame; ``box`` is (x1, y1, x2, y2) in pixels."""

    track_id: int
    box: tuple[float, float, float, float]
    score: float
    state: str  # one of TRACK_STATES
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
        return {
            "track_id": self.track_id,
            "box": list(self.box),
            "score": self.score,
            "state": self.state,
            "frames_since_update": self.frames_since_update,
            "innovation": self.innovation,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "track") -> TrackRecord:
        _require(isinstance(obj, dict), f"{where} must be a JSON object")
        _require("box" in obj, f"{where}: missing field 'box'")
        return cls(
            track_id=_field(obj, "track_id", int, where),
            box=_numbers(obj["box"], 4, float, f"{where}: box"),
            score=_field(obj, "score", float, where),
            state=_field(obj, "state", str, where),
            frames_since_update=_field(obj, "frames_since_update", int, where),
            innovation=_field(obj, "innovation", float, where),
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
    def _from_header(cls, header: dict[str, Any], frames: Sequence[Part]) -> MaskMessage:
        arrays = _decode_buffers(header, frames, "masks", "image")
        tracks = _field(header, "tracks", list, "header")
        frame_size = _pair(header, "frame_size", "header")
        _require(
            all(v > 0 for v in frame_size),
            f"header: frame_size must be positive, got {list(frame_size)}",
        )
        return cls(
            meta=FrameMeta.from_json(header),
            frame_size=frame_size,
            tracks=tuple(TrackRecord.from_json(t, f"track {i}") for i, t in enumerate(tracks)),
            masks=_unpack_windows(header, arrays["masks"], frame_size, len(tracks)),
            image=arrays.get("image"),
            timings=_number_map(header, "timings", float, "header"),
        )


def _unpack_windows(
    header: dict[str, Any], bits: np.ndarray, frame_size: tuple[int, int], count: int
) -> tuple[RegionMask, ...]:
    """The RegionMasks of a masks message: ``mask_windows`` and the ``masks`` buffer."""
    height, width = frame_size
    windows = _field(header, "mask_windows", list, "header")
    _require(
        len(windows) == count,
        f"header: {len(windows)} mask_windows for {count} tracks (one window per track)",
    )
    _require(
        bits.dtype == np.uint8 and bits.ndim == 1,
        f"buffer 'masks' must be uint8 [bytes], got {bits.dtype} {list(bits.shape)}",
    )
    boxes = []
    for i, window in enumerate(windows):
        x1, y1, x2, y2 = _numbers(window, 4, int, f"header: mask_windows[{i}]")
        _require(
            0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height,
            f"header: mask_windows[{i}] {window} does not lie in the {width}x{height} frame",
        )
        boxes.append((x1, y1, x2, y2))
    sizes = [(y2 - y1) * (x2 - x1) for x1, y1, x2, y2 in boxes]
    expected = sum((size + 7) // 8 for size in sizes)
    _require(
        bits.size == expected,
        f"buffer 'masks': {bits.size} bytes, but the mask_windows' bits take {expected}",
    )
    masks, start = [], 0
    for i, (box, size) in enumerate(zip(boxes, sizes, strict=True)):
        stop = start + (size + 7) // 8
        chunk = bits[start:stop]
        spare = -size % 8
        _require(
            spare == 0 or int(chunk[-1]) & ((1 << spare) - 1) == 0,
            f"buffer 'masks': the unused bits after window {i} must be zero",
        )
        x1, y1, x2, y2 = box
        window = np.unpackbits(chunk, count=size, bitorder="big").view(np.bool_)
        masks.append(RegionMask(frame_size, box, window.reshape(y2 - y1, x2 - x1)))
        start = stop
    return tuple(masks)


@dataclass(frozen=True)
class StatusMessage(_WireMessage):
    """A node's heartbeat: ``state`` ("starting", "running", "degraded", "stalled",
    "stopping", "failed"), wall-clock ``time``, counters and JSON-able ``detail``."""

    kind: ClassVar[str] = "status"

    node: str
    state: str
    time: float
    counters: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_frames(self) -> list[bytes | memoryview]:
        fields = {
            "node": self.node,
            "state": self.state,
            "time": self.time,
            "counters": self.counters,
            "detail": self.detail,
        }
        return _pack(self.kind, fields, [])

    @classmethod
    def _from_header(cls, header: dict[str, Any], frames: Sequence[Part]) -> StatusMessage:
        _check_no_buffers(header, frames)
        return cls(
            node=_field(header, "node", str, "header"),
            state=_field(header, "state", str, "header"),
            time=_field(header, "time", float, "header"),
            counters=_number_map(header, "counters", int, "header"),
            detail=_field(header, "detail", dict, "header", optional=True) or {},
        )


@dataclass(frozen=True)
class EndOfStream(_WireMessage):
    """A stream ended after ``frames`` frames; ``reason``: "eof", "max_frames",
    "error: ...", "stopped"."""

    kind: ClassVar[str] = "end"

    stream_id: str
    frames: int
    reason: str

    def to_frames(self) -> list[bytes | memoryview]:
        fields = {"stream_id": self.stream_id, "frames": self.frames, "reason": self.reason}
        return _pack(self.kind, fields, [])

    @classmethod
    def _from_header(cls, header: dict[str, Any], frames: Sequence[Part]) -> EndOfStream:
        _check_no_buffers(header, frames)
        return cls(
            stream_id=_field(header, "stream_id", str, "header"),
            frames=_field(header, "frames", int, "header"),
            reason=_field(header, "reason", str, "header"),
        )


Message = FrameMessage | EmbeddingMessage | MaskMessage | StatusMessage | EndOfStream

_KINDS: dict[str, type[_WireMessage]] = {
    cls.kind: cls
    for cls in (FrameMessage, EmbeddingMessage, MaskMessage, StatusMessage, EndOfStream)
}


def encode(msg: Message) -> list[bytes | memoryview]:
    """The parts of ``msg`` for ``send_multipart(copy=False)``."""
    if not isinstance(msg, _WireMessage):
        raise TypeError(f"not a pipeline message: {type(msg).__name__}")
    return msg.to_frames()


def decode(frames: Sequence[Part]) -> Message:
    """The message in ``frames``, whatever its kind; raises MessageError when malformed."""
    header = _parse_header(frames)
    cls = _KINDS.get(header["kind"])
    _require(cls is not None, f"unknown message kind {header['kind']!r} (known: {sorted(_KINDS)})")
    return cls._from_header(header, frames)


# ----------------------------------------------------------------------------- prompts


def _prompt_object(data: bytes | str, what: str, allowed: set[str]) -> dict[str, Any]:
    obj = _load_json(data, what)
    _require(isinstance(obj, dict), f"{what} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    # A typo ("bbox") must not silently become "no box".
    _require(not unknown, f"{what}: unknown field(s) {unknown}; known: {sorted(allowed)}")
    return obj


@dataclass(frozen=True)
class PromptCommand:
    """A run-time prompt request on the control socket.

    ``op``: "add" (needs box or points), "update" (needs track_id and box or points),
    "remove" (needs track_id), "list". ``points`` are (x, y) pixels with one SAM label each
    in ``labels`` (1 foreground, 0 background). ``frame``: apply from this frame index
    (None: the next frame). Whether boxes lie inside the frame is the tracker's check.
    """

    op: str
    track_id: int | None = None
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None
    labels: tuple[int, ...] | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        _require(self.op in PROMPT_OPS, f"prompt op {self.op!r} is not one of {PROMPT_OPS}")
        has_prompt = self.box is not None or self.points is not None
        if self.op in ("update", "remove"):
            _require(self.track_id is not None, f"prompt op '{self.op}' needs a track_id")
        if self.op in ("add", "update"):
            _require(has_prompt, f"prompt op '{self.op}' needs a box or points")
        if self.labels is not None:
            _require(
                self.points is not None and len(self.labels) == len(self.points),
                "prompt labels need points, one label per point",
            )

    def to_json(self) -> bytes:
        obj = {
            "op": self.op,
            "track_id": self.track_id,
            "box": None if self.box is None else list(self.box),
            "points": None if self.points is None else [list(p) for p in self.points],
            "labels": None if self.labels is None else list(self.labels),
            "frame": self.frame,
        }
        return _dump_json(obj)

    @classmethod
    def from_json(cls, data: bytes | str) -> PromptCommand:
        """Parse a request; raises MessageError on bad JSON, unknown op or wrong types."""
        where = "prompt command"
        obj = _prompt_object(data, where, {"op", "track_id", "box", "points", "labels", "frame"})
        box = obj.get("box")
        points = obj.get("points")
        labels = obj.get("labels")
        if points is not None:
            _require(isinstance(points, list), f"{where}: points must be a list of [x, y]")
            points = tuple(
                _numbers(p, 2, float, f"{where}: point {i}") for i, p in enumerate(points)
            )
        return cls(
            op=_field(obj, "op", str, where),
            track_id=_field(obj, "track_id", int, where, optional=True),
            box=None if box is None else _numbers(box, 4, float, f"{where}: box"),
            points=points,
            labels=None if labels is None else _numbers(labels, None, int, f"{where}: labels"),
            frame=_field(obj, "frame", int, where, optional=True),
        )


@dataclass(frozen=True)
class PromptReply:
    """The control socket's answer: ``ok`` or an ``error`` sentence; the new or affected
    ``track_id``; ``tracks`` lists the tracks (JSON objects) for "list"."""

    ok: bool
    error: str | None = None
    track_id: int | None = None
    tracks: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> bytes:
        obj = {
            "ok": self.ok,
            "error": self.error,
            "track_id": self.track_id,
            "tracks": list(self.tracks),
        }
        return _dump_json(obj)

    @classmethod
    def from_json(cls, data: bytes | str) -> PromptReply:
        """Parse a reply; raises MessageError on bad JSON or wrong types."""
        where = "prompt reply"
        obj = _prompt_object(data, where, {"ok", "error", "track_id", "tracks"})
        tracks = _field(obj, "tracks", list, where, optional=True) or []
        _require(all(isinstance(t, dict) for t in tracks), f"{where}: tracks must be objects")
        return cls(
            ok=_field(obj, "ok", bool, where),
            error=_field(obj, "error", str, where, optional=True),
            track_id=_field(obj, "track_id", int, where, optional=True),
            tracks=tuple(tracks),
        )
