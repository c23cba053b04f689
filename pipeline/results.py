"""`Results`: what `SAM.predict` returns for each image (a list, of one), shaped the way
Ultralytics users reach for it: ``results[0].masks.data``, ``results[0].boxes.xyxy``;
iterate or index it per object, draw it with ``.plot()``, write it with ``.save()``, export
COCO RLE with ``.to_json()``, and time it with ``.speed``.

The arrays are numpy arrays where Ultralytics has torch tensors: ``masks.data`` needs no
``.cpu().numpy()`` (and has no ``.cpu()``).

Images are RGB everywhere in this API (the order SAM's own predictor uses): ``plot()``
returns RGB, ``save()`` writes a correctly coloured file. Callers holding OpenCV's BGR say so
with ``image_format="BGR"`` on the way in (`SAM.predict`); nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.wire.masks import tight_box


@dataclasses.dataclass(frozen=True)
class Masks:
    """The objects' masks, as Ultralytics' ``Results.masks``: ``data`` (N, H, W) bool at the
    image's size."""

    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class Boxes:
    """Boxes around the masks, as Ultralytics' ``Results.boxes``: ``xyxy`` (N, 4) float32
    ``x1, y1, x2, y2`` around each mask's pixels (x2/y2 exclusive, as in every samstream
    output; a row of NaN for an empty mask), ``conf`` (N,) the predicted IoU."""

    xyxy: np.ndarray
    conf: np.ndarray


@dataclasses.dataclass(frozen=True)
class Results:
    """Masks for the objects of one image, in prompt order (with ``multimask_output``: three
    rows per prompt, prompt-major).

    masks: `Masks`, ``masks.data`` (N, H, W) bool at the image's size; scores: (N,) predicted
    IoU; logits: (N, h, w) low-res mask logits (256x256 at a 1024 input); image: the
    (H, W, 3) uint8 RGB image the masks belong to; path: the image's file, when it came from
    one; speed: milliseconds per step, Ultralytics' keys: ``preprocess`` (load, prompt
    checks), ``inference`` (encoder and mask decoder), ``postprocess`` (threshold, copy to
    the host).
    """

    masks: Masks
    scores: np.ndarray
    logits: np.ndarray
    image: np.ndarray
    path: str | None = None
    speed: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n, shape = len(self.masks.data), self.masks.data.shape
        if len(shape) != 3 or shape[1:] != self.image.shape[:2]:
            raise ValueError(f"masks {shape} do not match the image {self.image.shape[:2]}")
        if len(self.scores) != n or len(self.logits) != n:
            raise ValueError(f"{n} masks but {len(self.scores)} scores, {len(self.logits)} logits")

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: int | slice) -> Results:
        """The results of one object (or a slice of them), on the same image."""
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"object {index} out of range: {len(self)} object(s)")
            index = slice(index, index + 1 or None)
        if not isinstance(index, slice):
            raise TypeError(f"Results indices must be int or slice, not {type(index).__name__}")
        return dataclasses.replace(
            self,
            masks=Masks(self.masks.data[index]),
            scores=self.scores[index],
            logits=self.logits[index],
        )

    def __iter__(self) -> Iterator[Results]:
        return (self[i] for i in range(len(self)))

    @property
    def boxes(self) -> Boxes:
        """The `Boxes` around the masks, with their scores."""
        boxes = [tight_box(mask) or (np.nan,) * 4 for mask in self.masks.data]
        return Boxes(xyxy=np.array(boxes, dtype=np.float32).reshape(-1, 4), conf=self.scores)

    def box_list(self) -> list[tuple[float, float, float, float] | None]:
        """``boxes.xyxy`` as tuples, None for an empty mask (what the renderer and JSON take)."""
        return [None if np.isnan(box).any() else tuple(box.tolist()) for box in self.boxes.xyxy]

    def plot(self, *, boxes: bool = True, labels: bool = True) -> np.ndarray:
        """A new (H, W, 3) uint8 RGB image: the masks over the image, each object in its id's
        colour (object i is id i + 1), with its box and label: the renderer of a run's
        overlay video, so both look the same."""
        from pipeline.outputs.drawing import draw_overlay  # OpenCV: only when drawing

        ids = list(range(1, len(self) + 1))
        drawn_boxes = self.box_list() if boxes else None
        names = None if labels else [None] * len(self)
        return draw_overlay(self.image, self.masks.data, ids, drawn_boxes, labels=names)

    def save(self, filename: str | os.PathLike[str] = "results.png") -> Path:
        """Write ``plot()`` to an image file (format from the suffix: .png, .jpg, ...)."""
        path = Path(filename)
        try:
            Image.fromarray(self.plot()).save(path)
        except (ValueError, KeyError) as err:  # PIL: unknown extension
            raise ValueError(f"cannot save results as {path}: {err}") from err
        return path

    def to_json(self) -> str:
        """The objects as a JSON list: ``{"object": i (1-based), "score", "box" (or null),
        "segmentation": COCO compressed RLE {"size": [H, W], "counts": str}}``."""
        from pipeline.outputs.files import encode_rle  # pycocotools: only when asked for

        records = [
            {
                "object": i + 1,
                "score": round(float(self.scores[i]), 6),
                "box": box,
                "segmentation": encode_rle(self.masks.data[i]),
            }
            for i, box in enumerate(self.box_list())
        ]
        return json.dumps(records)
