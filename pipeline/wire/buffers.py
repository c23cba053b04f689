"""The buffer parts of a message: raw arrays after the header, and the fields sent as them.

A message field declared ``Annotated[type, Raw(...)]`` (or a `Raw` subclass such as
`MaskWindows`) travels as a buffer part, not in the header; `pipeline.wire.messages` has the
message kinds and the whole wire format in its docs. Here: what a buffer part is (`Part`,
`BufferSpec`), how an array becomes one without a copy (`raw_buffer`), how parts become
read-only arrays over the received bytes (`decode_buffers`), and `MessageError`, which every
reader raises for a message that does not follow the format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol, get_args

import msgspec
import numpy as np

from pipeline.wire.masks import RegionMask

RawDtype = Literal["uint8", "uint16", "float16", "float32"]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

# Raw buffer dtypes a reader accepts, pinned little-endian so the wire does not depend on
# the sender's byte order.
_RAW_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in get_args(RawDtype)}


class MessageError(ValueError):
    """A message that does not follow the wire format; the text says what is wrong."""


class _HasBuffer(Protocol):
    """A received part such as ``zmq.Frame`` (``recv_multipart(copy=False)``)."""

    @property
    def buffer(self) -> memoryview: ...


Part = bytes | bytearray | memoryview | _HasBuffer


def require(condition: bool, text: str) -> None:
    if not condition:
        raise MessageError(text)


def byte_view(part: Part, what: str) -> memoryview:
    """A flat byte view of a received part, without copying."""
    try:
        view = memoryview(getattr(part, "buffer", part))
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise MessageError(f"{what} is not a byte buffer ({type(part).__name__})") from exc


class Raw:
    """A field sent as it is: an array of one of ``dtypes`` whose shape reads ``shape``
    ("HxWx3": three dimensions, the last of size 3; letters are any size)."""

    header_fields: tuple[tuple[str, Any], ...] = ()  # what it adds to the header: nothing

    def __init__(self, shape: str, *dtypes: RawDtype) -> None:
        self.shape = shape
        self.dims = tuple(int(d) if d.isdigit() else None for d in shape.split("x"))
        self.dtypes = dtypes

    def check(self, kind: str, name: str, array: Any) -> None:
        ok = (
            isinstance(array, np.ndarray)
            and array.dtype.name in self.dtypes
            and array.ndim == len(self.dims)
            and all(d in (None, n) for d, n in zip(self.dims, array.shape, strict=False))
        )
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array)
        require(ok, f"{kind}: {name} must be {self.shape} {'/'.join(self.dtypes)}, got {got}")

    def to_wire(self, array: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        return {}, array

    def from_wire(self, array: np.ndarray, header: Any) -> Any:
        return array


Window = tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt]


class MaskWindows(Raw):
    """RegionMasks sent as their windows: ``mask_windows`` in the header, the windows' bits
    in a uint8 [B] buffer (module docs)."""

    header_fields = (("mask_windows", list[Window]),)

    def __init__(self) -> None:
        super().__init__("B", "uint8")  # what the buffer must be

    def check(self, kind: str, name: str, masks: Any) -> None:
        """Nothing here: MaskMessage cuts and checks its masks, which needs its frame size."""

    def to_wire(self, masks: tuple[RegionMask, ...]) -> tuple[dict[str, Any], np.ndarray]:
        packed = [np.packbits(m.window.reshape(-1), bitorder="big") for m in masks]
        bits = np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8)
        return {"mask_windows": [m.box for m in masks]}, bits

    def from_wire(self, bits: np.ndarray, header: Any) -> tuple[RegionMask, ...]:
        super().check("buffer", "masks", bits)
        height, width = header.frame_size
        for i, (x1, y1, x2, y2) in enumerate(header.mask_windows):
            require(
                x1 <= x2 <= width and y1 <= y2 <= height,
                f"header: mask_windows[{i}] {[x1, y1, x2, y2]} does not lie in the"
                f" {width}x{height} frame",
            )
        sizes = [(y2 - y1) * (x2 - x1) for x1, y1, x2, y2 in header.mask_windows]
        ends = np.cumsum([(size + 7) // 8 for size in sizes], dtype=int)
        require(
            bits.size == (expected := int(ends[-1]) if sizes else 0),
            f"buffer 'masks': {bits.size} bytes, but the mask_windows' bits take {expected}",
        )
        masks = []
        for i, (box, size, end) in enumerate(zip(header.mask_windows, sizes, ends, strict=True)):
            chunk = bits[end - (size + 7) // 8 : end]
            require(
                size % 8 == 0 or int(chunk[-1]) & (0xFF >> size % 8) == 0,
                f"buffer 'masks': the unused bits after window {i} must be zero",
            )
            x1, y1, x2, y2 = box
            window = np.unpackbits(chunk, count=size, bitorder="big").view(np.bool_)
            masks.append(RegionMask(header.frame_size, box, window.reshape(y2 - y1, x2 - x1)))
        return tuple(masks)


IMAGE = Raw("HxWx3", "uint8")  # an RGB frame


class BufferSpec(msgspec.Struct):
    """One raw buffer: the part after the previous one, ``prod(shape) * itemsize`` bytes."""

    name: str
    dtype: RawDtype
    shape: list[NonNegativeInt]
    # No encoding is defined: a reader refuses a buffer that names one rather than misread it.
    encoding: None = None


def raw_buffer(name: str, array: np.ndarray) -> tuple[BufferSpec, memoryview]:
    """The header spec and a zero-copy byte view of one raw buffer (of a checked dtype)."""
    # Copies only when the array is not C-contiguous or not little-endian.
    array = np.ascontiguousarray(array, dtype=_RAW_DTYPES[array.dtype.name])
    spec = BufferSpec(name, array.dtype.name, list(array.shape))
    return spec, memoryview(array.reshape(-1).view(np.uint8))


def decode_buffers(specs: Sequence[BufferSpec], frames: Sequence[Part]) -> dict[str, np.ndarray]:
    """The arrays of the buffer parts ``frames[1:]`` that ``specs`` list, by name: read-only
    views over the received bytes, each part checked to be exactly its spec's size."""
    require(
        len(frames) == 1 + len(specs),
        f"message has {len(frames)} part(s) but its header lists {len(specs)} buffer(s)"
        f" (expected {1 + len(specs)} parts)",
    )
    arrays = {}
    for i, spec in enumerate(specs):
        view = byte_view(frames[i + 1], f"part {i + 1}")
        dtype = _RAW_DTYPES[spec.dtype]
        expected = math.prod(spec.shape) * dtype.itemsize
        require(
            view.nbytes == expected,
            f"buffer '{spec.name}': {view.nbytes} bytes do not match {spec.dtype}"
            f" {spec.shape} ({expected} bytes)",
        )
        arrays[spec.name] = np.frombuffer(view, dtype).reshape(spec.shape)
    return arrays
