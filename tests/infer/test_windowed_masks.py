"""Windowed masks are the full-frame masks: upscaling, contested pixels, exclusivity, tracks.

The oracle is the full-frame path the windows replace: ``MobileSAM.upscale_masks`` over the
whole frame per object, thresholded, contested pixels where two rows' full-frame masks are
True (``OldDecoder`` below is the tracker's decoder as it was before windows). Everything
is compared for equality, bit for bit where logits are compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.tracker import TrackerNode
from pipeline.config import TrackerConfig
from pipeline.infer.encoder import ImageEmbedding
from pipeline.infer.mask_decoder import SamMaskDecoder, probe_windows
from pipeline.infer.upscale import EMPTY_BOX, Upscaler, matches_full_frame
from pipeline.model.transforms import resized_shape
from pipeline.predictor import SAM
from pipeline.prompts import Prompts
from pipeline.track.exclusive import ContestedPixels, DecodedMasks, exclusive_masks
from pipeline.track.measure import measure_box
from pipeline.track.tracking import PromptTracker
from pipeline.wire.masks import RegionMask
from pipeline.wire.messages import EmbeddingMessage, FrameMeta

pytestmark = pytest.mark.timeout(300)

# (input side, (H, W)): the run's 1280x720 at 1024, the tests' small frames, a frame equal to
# the resized input (no second resize), downscaling, odd sizes, 1080p.
GEOMETRIES = [
    (1024, (720, 1280)),
    (256, (96, 128)),
    (256, (192, 256)),
    (1024, (300, 200)),
    (512, (97, 1001)),
    (1024, (342, 548)),
    (1024, (1080, 1920)),
]
OPEN = TrackerConfig(min_score=0.0, min_agreement=0.0)


def full_frame(model: torch.nn.Module, input_size, size):
    def upscale(low: torch.Tensor) -> torch.Tensor:
        return model.upscale_masks(low[None, None], input_size, size)[0, 0]

    return upscale


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SAM:
    return SAM(checkpoint, device="cpu", image_size=256)


@pytest.fixture(scope="module")
def sam_1024(checkpoint: Path) -> SAM:
    return SAM(checkpoint, device="cpu", image_size=1024)


def upscaler_for(side: int, size: tuple[int, int]) -> Upscaler:
    return Upscaler(
        low_size=side // 4,
        padded_size=side,
        input_size=resized_shape(*size, side),
        original_size=size,
    )


def blobs(g: int, centres: list[tuple[float, float, float]], seed: int = 0) -> np.ndarray:
    """(g, g) float32 low-res logits: positive discs (cx, cy, radius in low-res pixels) on a
    negative background with noise, like a trained model's masks."""
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    out = np.full((g, g), -8.0, np.float32)
    for cx, cy, r in centres:
        out = np.maximum(out, 6.0 * (1 - np.hypot(xs - cx, ys - cy) / r))
    noise = np.random.default_rng(seed).normal(0, 0.3, (g, g)).astype(np.float32)
    return out + noise


# --------------------------------------------------------------------------- the upscaling


@pytest.mark.parametrize(("side", "size"), GEOMETRIES)
def test_window_logits_are_the_full_frame_logits_bit_for_bit(sam, side, size) -> None:
    model = sam.model  # upscale_masks only uses img_size: set it per geometry below
    upscaler = upscaler_for(side, size)
    input_size = upscaler.input_size
    generator = torch.Generator().manual_seed(side + size[0])
    low = 16 * torch.randn((side // 4, side // 4), generator=generator)
    with torch.inference_mode():
        up = torch.nn.functional.interpolate(
            low[None, None], (side, side), mode="bilinear", align_corners=False
        )
        full = torch.nn.functional.interpolate(
            up[..., : input_size[0], : input_size[1]], size, mode="bilinear", align_corners=False
        )[0, 0]
    if side == model.img_size:
        assert torch.equal(full, model.upscale_masks(low[None, None], input_size, size)[0, 0])
    rng = np.random.default_rng(1)
    height, width = size
    boxes = probe_windows(size)
    for _ in range(40):  # small windows anywhere, the objects' usual case
        x1, y1 = int(rng.integers(0, width)), int(rng.integers(0, height))
        boxes.append(
            (
                x1,
                y1,
                min(width, x1 + int(rng.integers(1, 40))),
                min(height, y1 + int(rng.integers(1, 40))),
            )
        )
    for box in boxes:
        x1, y1, x2, y2 = box
        got = upscaler.window_logits(low, box)
        assert got.dtype == torch.float32 and got.shape == (y2 - y1, x2 - x1)
        assert torch.equal(got, full[y1:y2, x1:x2]), box


def test_the_one_off_check_passes_here_and_catches_a_wrong_reference(sam_1024) -> None:
    size = (720, 1280)
    upscaler = upscaler_for(1024, size)
    reference = full_frame(sam_1024.model, upscaler.input_size, size)
    device = torch.device("cpu")
    assert matches_full_frame(upscaler, reference, device, probe_windows(size))

    def off_by_an_ulp(low: torch.Tensor) -> torch.Tensor:
        out = reference(low)
        out[300, 600] = torch.nextafter(out[300, 600], torch.tensor(np.inf))
        return out

    assert not matches_full_frame(upscaler, off_by_an_ulp, device, [(590, 290, 610, 310)])


@pytest.mark.parametrize(("side", "size"), GEOMETRIES)
def test_windows_hold_every_positive_pixel_and_little_else(sam, side, size) -> None:
    g = side // 4
    upscaler = upscaler_for(side, size)
    h, w = upscaler.input_size
    # Objects anywhere in the image part of the low-res map: inside, at its edges, tiny (one
    # low-res pixel), huge (most of the frame).
    rows, cols = h / 4, w / 4
    cases = [
        [(cols / 2, rows / 2, 3.0)],
        [(0.0, 0.0, 4.0)],
        [(cols - 1, rows - 1, 4.0)],
        [(cols / 3, rows - 1, 0.6)],
        [(cols / 2, rows / 2, max(rows, cols))],
        [(cols / 4, rows / 4, 2.0), (3 * cols / 4, 3 * rows / 4, 2.0)],
    ]
    lows = np.stack([blobs(g, case, seed=i) for i, case in enumerate(cases)])
    boxes = upscaler.windows(lows)
    with torch.inference_mode():
        full = upscaler_full(lows, side, upscaler)
    # One low-res pixel is side / 4 / long side of the frame (in input pixels 4, in frame
    # pixels 4 * H / h); a window may exceed the positives by that plus the kernel's slack.
    reach = 4 * max(size[0] / h, size[1] / w) * 2 + 3
    for box, logits in zip(boxes, full, strict=True):
        positive = logits > 0
        region = RegionMask.from_dense(positive)
        x1, y1, x2, y2 = box
        inside = np.zeros_like(positive)
        inside[y1:y2, x1:x2] = True
        assert not (positive & ~inside).any(), box  # nothing positive outside the window
        if region.any():
            tx1, ty1, tx2, ty2 = region.box
            assert x1 <= tx1 and y1 <= ty1 and x2 >= tx2 and y2 >= ty2
            assert max(tx1 - x1, ty1 - y1, x2 - tx2, y2 - ty2) <= reach, (box, region.box)
    assert upscaler.windows(np.full((1, g, g), -1.0, np.float32)) == [EMPTY_BOX]
    assert upscaler.windows(np.full((1, g, g), 1.0, np.float32)) == [(0, 0, size[1], size[0])]


def upscaler_full(lows: np.ndarray, side: int, upscaler: Upscaler) -> np.ndarray:
    low = torch.from_numpy(lows)[:, None]
    up = torch.nn.functional.interpolate(low, (side, side), mode="bilinear", align_corners=False)
    h, w = upscaler.input_size
    out = torch.nn.functional.interpolate(
        up[..., :h, :w], upscaler.original_size, mode="bilinear", align_corners=False
    )
    return out[:, 0].numpy()


def test_tiny_frames_use_the_full_frame_resize() -> None:
    """Outputs of height + width <= 128 take another algorithm of PyTorch's kernel: windows
    of such frames are not attempted (the decoder upscales them whole)."""
    with pytest.raises(ValueError, match="full-frame resize"):
        upscaler_for(256, (40, 60))


# --------------------------------------------------------------------------- the decoder


class OldDecoder:
    """The tracker's decoder as it was before windows: SAM.decode's full-frame logits per
    row, own masks their threshold, contested pixels where two full-frame masks are True."""

    def __init__(self, sam: SAM, *, exclusive: bool = True) -> None:
        self.sam, self.exclusive = sam, exclusive

    @torch.inference_mode()
    def __call__(self, image, boxes, mask_logits, points=None) -> DecodedMasks:
        n = len(boxes)
        h, w = image.original_size
        logits = torch.zeros((n, h, w))
        scores = np.zeros(n, np.float32)
        low_res = None

        def has_points(i: int) -> bool:
            return points is not None and points[i] is not None

        plain = [i for i in range(n) if not has_points(i) and mask_logits[i] is None]
        with_mask = [i for i in range(n) if not has_points(i) and mask_logits[i] is not None]
        for rows in filter(None, [plain, with_mask, *([i] for i in range(n) if has_points(i))]):
            box_rows = boxes[rows]
            point = points[rows[0]] if points is not None else None
            prompts = Prompts(
                boxes=None if np.isnan(box_rows).any() else box_rows.astype(np.float32),
                points=None if point is None else point[0][None].astype(np.float32),
                labels=None if point is None else point[1][None].astype(np.int32),
            )
            mask_inputs = None
            if mask_logits[rows[0]] is not None:
                stacked = np.stack([mask_logits[i] for i in rows]).astype(np.float32)
                mask_inputs = torch.from_numpy(stacked)[:, None]
            batch, batch_scores, batch_low = self.sam.decode(
                image, prompts, mask_inputs=mask_inputs
            )
            logits[rows] = batch[:, 0]
            scores[rows] = batch_scores[:, 0].numpy()
            if low_res is None:
                low_res = np.zeros((n, *batch_low.shape[-2:]), np.float32)
            low_res[rows] = batch_low[:, 0].numpy()
        positive = logits > self.sam.model.mask_threshold
        contested = None
        if self.exclusive:
            index = torch.nonzero(positive.sum(dim=0).flatten() >= 2).squeeze(1)
            contested = ContestedPixels(
                index.numpy().astype(np.int64), logits.flatten(1)[:, index].numpy()
            )
        self.full_logits = logits.numpy()
        return DecodedMasks(positive.numpy(), scores, low_res, contested)


def embedding(sam: SAM, size: tuple[int, int], seed: int) -> ImageEmbedding:
    """A random embedding (the weights are random too: the encoder adds nothing here)."""
    grid = sam.image_size // 16
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn((1, 256, grid, grid), generator=generator)
    return ImageEmbedding(values, size, resized_shape(*size, sam.image_size))


def full_frame_exclusive(masks: np.ndarray, contested: ContestedPixels, priority) -> list:
    """``exclusive_masks`` as it was on (N, H, W) masks and pixel-listed logits."""
    count = masks.shape[0]
    classes = np.asarray(priority, dtype=np.int64)
    out = [masks[row] if classes[row] >= 0 else np.zeros_like(masks[row]) for row in range(count)]
    index = contested.index
    if index.size == 0 or count == 0:
        return out
    claims = masks.reshape(count, -1)[:, index] & (classes >= 0)[:, None]
    ranked = np.where(claims, classes[:, None], np.iinfo(np.int64).max)
    eligible = claims & (ranked == ranked.min(axis=0, keepdims=True))
    winner = np.where(eligible, contested.logits, -np.inf).argmax(axis=0)
    taken = eligible.any(axis=0)
    for row in range(count):
        if classes[row] < 0 or not claims[row].any():
            continue
        mine = taken & (winner == row)
        if np.array_equal(mine, claims[row]):
            continue
        own = masks[row].copy()
        own.reshape(-1)[index] = mine
        out[row] = own
    return out


PRIORITIES = ([0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, -1, 0, 1, 0], [-1, 0, 0, 1, 1, 1])


def assert_same_decoded(new: DecodedMasks, old: DecodedMasks, old_logits: np.ndarray) -> None:
    assert all(isinstance(m, RegionMask) for m in new.masks)
    assert np.array_equal(np.stack([m.dense() for m in new.masks]), old.masks)
    assert np.array_equal(new.scores, old.scores)
    assert np.array_equal(new.low_res_logits, old.low_res_logits)
    assert (new.contested is None) == (old.contested is None)
    if new.contested is None or old.contested is None:
        return
    assert new.contested.windows is not None
    for row, (mask, window) in enumerate(zip(new.masks, new.contested.windows, strict=True)):
        rows, cols = mask.slices
        assert np.array_equal(window, old_logits[row][rows, cols])  # bit for bit
    count = len(new.masks)
    for priority in PRIORITIES:
        got = exclusive_masks(new.masks, new.contested, priority[:count])
        want = full_frame_exclusive(old.masks, old.contested, priority[:count])
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a.dense(), b)


BOXES_96x128 = np.array(
    [[0, 0, 64, 96], [40, 0, 128, 96], [0, 0, 20, 15], [100, 70, 128, 96], [2, 2, 126, 94]],
    dtype=np.float32,
)


@pytest.mark.parametrize("exclusive", [True, False])
@pytest.mark.parametrize("windowed", [True, False])
def test_decoder_masks_are_the_full_frame_masks(sam, exclusive, windowed) -> None:
    """Random-weight decoder outputs, boxes that overlap, touch the frame's edges and cover
    nearly all of it; plain, mask-prompted and points rows in one frame."""
    size = (96, 128)
    image = embedding(sam, size, seed=1)
    old = OldDecoder(sam, exclusive=exclusive)
    new = SamMaskDecoder(sam.model, exclusive=exclusive, windowed=windowed)
    first = old(image, BOXES_96x128, [None] * 5)
    previous = [first.low_res_logits[i] for i in range(5)]
    points = (np.array([[50.0, 48.0], [5.0, 90.0]], np.float32), np.array([1, 0], np.int32))
    boxes = np.vstack([BOXES_96x128, np.full((1, 4), np.nan, np.float32)])
    cases = [
        (BOXES_96x128, [None] * 5, None),
        (BOXES_96x128, previous, None),
        (
            boxes,
            [None, previous[1], None, previous[3], None, None],
            [None, None, None, None, None, points],
        ),
    ]
    for case_boxes, logits, case_points in cases:
        want = old(image, case_boxes, logits, case_points)
        got = new(image, case_boxes, logits, case_points)
        assert_same_decoded(got, want, old.full_logits)
    if windowed:
        assert new.upscaler_for(64, size, image.input_size) is not None  # windows were used


class ScriptedLowRes(SamMaskDecoder):
    """The real decoder, with the network's low-res logits replaced by scripted ones (row i
    of a frame's prompts: case i): masks of chosen shapes (empty, tiny, at every edge,
    covering the frame) through the real upscaling and contested pixels."""

    def __init__(self, sam: SAM, lows: np.ndarray, **kwargs) -> None:
        super().__init__(sam.model, **kwargs)
        self.lows = lows

    def _decode(self, image, boxes, mask_logits, points, rows):
        low = torch.from_numpy(self.lows[rows])[:, None]
        return low, torch.full((len(rows), 1), 0.9)


def scripted_cases(g: int, rows: float, cols: float) -> np.ndarray:
    return np.stack(
        [
            np.full((g, g), -6.0, np.float32),  # an empty mask
            blobs(g, [(0.0, 0.0, 5.0)], seed=1),  # the top-left corner
            blobs(g, [(cols - 1, rows / 2, 4.0)], seed=2),  # the right edge
            blobs(g, [(cols / 2, rows - 1, 4.0)], seed=3),  # the bottom edge
            blobs(g, [(cols / 2, rows / 2, max(rows, cols))], seed=4),  # most of the frame
            blobs(g, [(cols / 2, rows / 2, 0.7)], seed=5),  # one low-res pixel
            blobs(g, [(cols / 2 + 3, rows / 2, 6.0)], seed=6),  # overlaps the big one
            np.full((g, g), 3.0, np.float32),  # the whole frame
        ]
    )


@pytest.mark.parametrize(("side", "size"), [(1024, (720, 1280)), (256, (96, 128))])
def test_scripted_masks_of_every_shape_are_the_full_frame_masks(sam, sam_1024, side, size):
    model_sam = sam_1024 if side == 1024 else sam
    g = side // 4
    h, w = resized_shape(*size, side)
    lows = scripted_cases(g, h / 4, w / 4)
    image = embedding(model_sam, size, seed=2)
    # Row i is case i: the scripted decoder takes each row's logits by its index.
    boxes = np.array([[i, 0, i + 1, 1] for i in range(len(lows))], np.float32)
    with torch.inference_mode():
        full = model_sam.model.upscale_masks(torch.from_numpy(lows)[:, None], (h, w), size)
    full = full[:, 0].numpy()
    own = full > 0
    for exclusive in (True, False):
        decoder = ScriptedLowRes(model_sam, lows, exclusive=exclusive)
        got = decoder(image, boxes, [None] * len(lows))
        assert np.array_equal(np.stack([m.dense() for m in got.masks]), own)
        assert not got.masks[0].any() and got.masks[0].box == EMPTY_BOX
        assert got.masks[-1].box == (0, 0, size[1], size[0])
        big, small = got.masks[4], got.masks[5]
        assert big.width * big.height > 0.5 * size[0] * size[1] > 50 * small.width * small.height
        if exclusive:
            index = np.flatnonzero(own.sum(axis=0).reshape(-1) >= 2)
            assert index.size > 1000  # the big masks overlap a lot
            oracle = ContestedPixels(index, full.reshape(len(lows), -1)[:, index])
            for priority in ([0] * 8, [0, 0, 1, 0, 0, 0, 0, -1], [1, 1, 0, 0, 1, 0, 1, 0]):
                windowed = exclusive_masks(got.masks, got.contested, priority)
                listed = exclusive_masks(own, oracle, priority)  # the pixel-listed form
                for a, b, c in zip(
                    windowed, listed, full_frame_exclusive(own, oracle, priority), strict=True
                ):
                    assert np.array_equal(a.dense(), c) and np.array_equal(b.dense(), c)
        else:
            assert got.contested is None


def test_measurement_on_a_window_is_the_measurement_on_its_frame() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        mask = np.zeros((120, 160), bool)
        for _ in range(rng.integers(0, 5)):
            x, y = rng.integers(0, 150), rng.integers(0, 110)
            mask[y : y + rng.integers(1, 40), x : x + rng.integers(1, 50)] = True
        x, y = rng.uniform(-20, 160), rng.uniform(-20, 120)
        reference = (
            None if rng.random() < 0.1 else (x, y, x + rng.uniform(3, 50), y + rng.uniform(3, 50))
        )
        region = RegionMask.from_dense(mask)
        loose = RegionMask((120, 160), (0, 0, 160, 120), mask)
        want = measure_box(mask, reference)
        assert measure_box(region, reference) == want == measure_box(loose, reference)


# --------------------------------------------------------------------------- the tracker


@pytest.mark.parametrize("exclusive", [True, False])
def test_tracks_with_windows_are_the_tracks_with_full_frames(sam, exclusive) -> None:
    """Whole frames of tracking (measurement, mask prompts, exclusivity) with the windowed
    decoder and with the old full-frame one: the same boxes, states, scores and masks."""
    size = (96, 128)
    new = SamMaskDecoder(sam.model, exclusive=exclusive)
    old = OldDecoder(sam, exclusive=exclusive)
    trackers = [
        PromptTracker(new, frame_size=size, settings=OPEN),
        PromptTracker(old, frame_size=size, settings=OPEN),
    ]
    for tracker in trackers:
        for box in BOXES_96x128:
            tracker.commands.add(box=box)
    for frame in range(4):
        image = embedding(sam, size, seed=10 + frame)
        got, want = (tracker.step(frame, image) for tracker in trackers)
        assert [o.record for o in got] == [o.record for o in want]
        for a, b in zip(got, want, strict=True):
            assert isinstance(a.mask, RegionMask)
            assert np.array_equal(a.mask.dense(), b.mask.dense())


def test_tracker_node_publishes_tight_windows(sam, checkpoint) -> None:
    size = (96, 128)
    config = TrackerConfig(device="cpu", min_score=0.0, min_agreement=0.0)
    node = TrackerNode(config, weights=str(checkpoint), image_size=256)
    node.setup()
    for box in BOXES_96x128:
        node.tracker.commands.add(box=box)
    image = embedding(sam, size, seed=20)
    meta = FrameMeta("cam0", 0, 0, 0, (1, 25), 100.0)
    msg = node.process(
        EmbeddingMessage(
            meta=meta,
            embedding=image.embedding[0].numpy(),
            embedding_dtype="float32",
            original_size=size,
            input_size=image.input_size,
        )
    )[0]
    assert len(msg.masks) == len(BOXES_96x128)
    for region in msg.masks:
        if region.any():
            assert region.tight() is region  # already the smallest window
        else:
            assert region.box == EMPTY_BOX
