"""The publisher's outputs from mask windows are the outputs from full-frame masks.

The oracles are the full-frame implementations the windowed ones replaced (id PNG painted
over the whole frame per track, COCO RLE of each whole frame, overlay blended and outlined
over the whole frame), kept here as they were. PNG bytes, RLE strings and overlay pixels
must be equal.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.outputs.drawing import OVERLAY_ALPHA, PALETTE, draw_overlay, track_color
from pipeline.outputs.files import decode_rle, encode_rle, id_mask
from pipeline.outputs.writer import MaskWriter
from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import FrameMeta, MaskMessage, TrackRecord, TrackState

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- the old ones


def full_frame_id_mask(masks: np.ndarray, track_ids: list[int]) -> np.ndarray:
    painted = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, track_id in zip(masks, track_ids, strict=True):
        painted[mask] = int(track_id)
    return painted


def full_frame_rle(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"].decode()


def full_frame_overlay(
    image: np.ndarray, masks: np.ndarray, ids: list[int], alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    out = image.copy()
    for i, track_id in enumerate(ids):
        mask = masks[i]
        if not mask.any():
            continue
        color = track_color(track_id)
        tinted = out[mask].astype(np.float32) * (1 - alpha) + np.array(color) * alpha
        out[mask] = tinted.astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(out, contours, -1, color, 1)
    return out


def png_bytes(painted: np.ndarray) -> bytes:
    height, width = painted.shape
    png = Image.frombytes("P", (width, height), np.ascontiguousarray(painted).tobytes())
    png.putpalette(PALETTE)
    buffer = io.BytesIO()  # as MaskWriter saves it, to memory
    png.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- scenes


def scene(size: tuple[int, int], count: int, seed: int) -> np.ndarray:
    """(count, H, W) masks of the shapes objects have: ellipses with holes and stray bits,
    overlapping each other, at the frame's edges and corners, one covering most of the
    frame, one empty, one a single pixel, one the whole frame."""
    height, width = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width), dtype=bool)
    for i in range(count):
        kind = i % 8
        if kind == 0:
            continue  # empty
        if kind == 1:
            masks[i, rng.integers(0, height), rng.integers(0, width)] = True
            continue
        if kind == 2:
            masks[i] = True
            continue
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        rx, ry = rng.uniform(1, max(width / 4, 1)), rng.uniform(1, max(height / 4, 1))
        if kind == 3:
            cx, cy, rx, ry = width / 2, height / 2, width * 0.6, height * 0.6  # most of it
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        holes = rng.random((height, width)) < 0.03
        masks[i] = inside & ~holes
        x, y = rng.integers(0, width), rng.integers(0, height)
        masks[i, y : y + 3, x : x + 2] = True  # a stray fragment
    return masks


SIZES = [(480, 640), (97, 131), (1, 7), (6, 1), (240, 320)]


@pytest.mark.parametrize("size", SIZES)
def test_png_rle_and_overlay_from_windows_are_the_full_frame_ones(size) -> None:
    masks = scene(size, 17, seed=size[0])
    ids = list(range(1, 18))
    regions = [RegionMask.from_dense(mask) for mask in masks]
    # Windows that are not tight must give the same too (a decoder's window is a bound).
    loose = [RegionMask(size, (0, 0, size[1], size[0]), mask) for mask in masks]
    want_painted = full_frame_id_mask(masks, ids)
    for given in (regions, loose, masks):
        painted = id_mask(given, ids, size)
        assert np.array_equal(painted, want_painted)
        assert png_bytes(painted) == png_bytes(want_painted)
    for mask, region, wide in zip(masks, regions, loose, strict=True):
        want = full_frame_rle(mask)
        assert encode_rle(region) == encode_rle(wide) == encode_rle(mask)
        assert encode_rle(region) == {"size": list(size), "counts": want}
        assert np.array_equal(decode_rle(encode_rle(region)), mask)
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    want_overlay = full_frame_overlay(image, masks, ids)
    for given in (regions, loose, masks):
        assert np.array_equal(draw_overlay(image, given, ids), want_overlay)


@pytest.mark.parametrize("alpha", [0.3, 0.77, 1.0])
def test_overlay_tint_is_the_blend_at_any_opacity(alpha: float) -> None:
    """The tint comes from a per-value table: it must be the blend's arithmetic (float32
    times 1 - alpha, plus the colour times alpha, truncated) for every value and colour."""
    size = (64, 256)
    image = np.zeros((*size, 3), np.uint8)
    image[..., 0] = np.arange(256)  # every value, in every channel
    image[..., 1] = np.arange(256)[::-1]
    image[..., 2] = (np.arange(256) * 7) % 256
    masks = np.zeros((12, *size), bool)
    for i in range(12):
        masks[i, 5 * i : 5 * i + 5] = True
    ids = [1, 2, 3, 4, 7, 60, 128, 200, 254, 255, 31, 99]
    regions = [RegionMask.from_dense(m) for m in masks]
    assert np.array_equal(
        draw_overlay(image, regions, ids, alpha=alpha), full_frame_overlay(image, masks, ids, alpha)
    )


def test_rle_from_windows_on_random_masks() -> None:
    """Every run pattern: runs across columns, windows of full height (no rows outside),
    windows of one row or column, masks ending on a set pixel."""
    rng = np.random.default_rng(7)
    for trial in range(2000):
        height, width = (int(v) for v in rng.integers(1, 24, 2))
        mask = np.zeros((height, width), bool)
        x1, x2 = sorted(int(v) for v in rng.integers(0, width + 1, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, height + 1, 2))
        if trial % 5 == 0:
            y1, y2 = 0, height
        density = rng.random()
        mask[y1:y2, x1:x2] = rng.random((y2 - y1, x2 - x1)) < density
        if trial % 7 == 0:
            mask[-1, -1] = True
        region = RegionMask.from_dense(mask)
        assert encode_rle(region)["counts"] == full_frame_rle(mask), (trial, region)


def Track(
    track_id: int, box: tuple[float, float, float, float], score: float, state: str
) -> TrackRecord:
    """A track's record as the tracker sends it (how it got there is not the writer's)."""
    return TrackRecord(track_id, box, score, TrackState(state), 0, 0.0)


def test_writer_files_from_windows_are_the_full_frame_files(tmp_path: Path) -> None:
    """The files MaskWriter writes from windows: PNG bytes as the old full-frame painting
    gives them, JSON lines with the old RLE strings, the same overlay video as from the
    full-frame masks (its frames come from draw_overlay, checked above)."""
    size = (120, 160)
    frames = [scene(size, 9, seed=frame) for frame in range(4)]
    images = [
        np.random.default_rng(frame).integers(0, 256, (*size, 3), dtype=np.uint8)
        for frame in range(4)
    ]
    tracks = [Track(i + 1, (1.0, 2.0, 30.0, 40.0), 0.9, "tracked") for i in range(9)]
    outputs = {}
    for kind in ("windows", "dense"):
        out = tmp_path / kind
        with MaskWriter(out) as writer:
            for frame, (masks, image) in enumerate(zip(frames, images, strict=True)):
                given = [RegionMask.from_dense(m) for m in masks] if kind == "windows" else masks
                meta = FrameMeta("cam0", frame, frame, frame * 40, (1, 1000), 0.0)
                writer.write(
                    MaskMessage(
                        meta=meta, frame_size=size, tracks=tuple(tracks), masks=given, image=image
                    )
                )
        outputs[kind] = out
    for frame, masks in enumerate(frames):
        png = (outputs["windows"] / "masks" / f"{frame:06d}.png").read_bytes()
        assert png == png_bytes(full_frame_id_mask(masks, [t.track_id for t in tracks]))
        assert png == (outputs["dense"] / "masks" / f"{frame:06d}.png").read_bytes()
    lines = (outputs["windows"] / "masks.jsonl").read_text().splitlines()
    for line, masks in zip(lines, frames, strict=True):
        record = json.loads(line)
        assert [t["rle"]["counts"] for t in record["tracks"]] == [full_frame_rle(m) for m in masks]
    for name in ("masks.jsonl", "tracks.txt", "overlay.mp4"):
        assert (outputs["windows"] / name).read_bytes() == (outputs["dense"] / name).read_bytes()
