"""Exclusive masks with the real SamMaskDecoder (random-weight MobileSAM, 256 input, small frame).

The oracle for every logit is the project's own ``SAM.decode`` run on one row at a time: the
decoder under test batches rows by prompt kind, so its contested pixels must be found across
its separate calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.trackers import sam_embedding_message

from nodes.tracker import TrackerNode
from pipeline.config import PromptConfig, TrackerConfig
from pipeline.infer.encoder import ImageEmbedding
from pipeline.infer.mask_decoder import SamMaskDecoder
from pipeline.predictor import SAM
from pipeline.prompts import Prompts
from pipeline.track.exclusive import exclusive_masks
from pipeline.track.tracking import PromptTracker, TrackOutput
from pipeline.wire.messages import MaskMessage, TrackState

pytestmark = pytest.mark.timeout(120)

SIZE = (96, 128)  # H, W
# Two boxes that overlap by 24 columns. With the seeded random weights both masks cover part
# of the overlap, each wins some of it, and both predicted-IoU scores are >= 0.
BOXES = np.array([[0, 0, 64, 96], [40, 0, 128, 96]], dtype=np.float32)
# Gates open wide so both tracks are trusted on their first frame (random weights score ~0).
OPEN = TrackerConfig(min_score=0.0, min_agreement=0.0)


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SAM:
    torch.manual_seed(0)
    return SAM(checkpoint, device="cpu", image_size=256)


@pytest.fixture(scope="module")
def embedded(sam: SAM) -> ImageEmbedding:
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    return sam.set_image(image)


def row_logits(
    sam: SAM,
    embedded: ImageEmbedding,
    box: np.ndarray | None = None,
    points: tuple[np.ndarray, np.ndarray] | None = None,
    mask_input: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W) full-resolution logits of one prompt, decoded alone."""
    prompts = Prompts(
        boxes=None if box is None else box[None].astype(np.float32),
        points=None if points is None else points[0][None].astype(np.float32),
        labels=None if points is None else points[1][None].astype(np.int32),
    )
    mask_inputs = None if mask_input is None else torch.from_numpy(mask_input)[None, None]
    logits, _, _ = sam.decode(embedded, prompts, mask_inputs=mask_inputs)
    return logits[0, 0].numpy()


def track_frame(sam: SAM, embedded: ImageEmbedding, *, exclusive: bool) -> list[TrackOutput]:
    decoder = SamMaskDecoder(sam.model, exclusive=exclusive)
    tracker = PromptTracker(decoder, frame_size=SIZE, settings=OPEN)
    for box in BOXES:
        tracker.commands.add(box=box)
    return tracker.step(0, embedded)


def expected_owner(logits: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) row index of the highest logit among rows above the threshold, -1 for none."""
    above = np.where(logits > threshold, logits, -np.inf)
    return np.where(np.isfinite(above).any(axis=0), above.argmax(axis=0), -1)


def test_exclusive_tracker_masks_give_each_pixel_to_the_highest_logit(sam, embedded):
    threshold = sam.model.mask_threshold
    logits = np.stack([row_logits(sam, embedded, box) for box in BOXES])
    own = logits > threshold
    overlap = own[0] & own[1]
    # The setup must really overlap, and each object must win part of the overlap, or the
    # checks below prove nothing.
    assert overlap.sum() > 100
    assert (overlap & (logits[0] > logits[1])).any() and (overlap & (logits[1] > logits[0])).any()

    shared = track_frame(sam, embedded, exclusive=False)
    assert all(
        o.record.state is TrackState.TENTATIVE and o.record.frames_since_update == 0 for o in shared
    )
    shared_masks = np.stack([o.mask for o in shared])
    assert np.array_equal(shared_masks, own)  # false: each track keeps its own mask
    assert (shared_masks.sum(axis=0) > 1).any()

    outputs = track_frame(sam, embedded, exclusive=True)
    assert all(o.record.state is TrackState.TENTATIVE for o in outputs)
    assert all(o.record.frames_since_update == 0 for o in outputs)
    masks = np.stack([o.mask for o in outputs])
    assert masks.sum(axis=0).max() == 1  # no pixel in two masks
    assert np.array_equal(masks.any(axis=0), shared_masks.any(axis=0))  # same union
    owner = np.where(masks.any(axis=0), masks.argmax(axis=0), -1)
    assert np.array_equal(owner, expected_owner(logits, threshold))
    # The measurement is the object's own mask, not its exclusive share (see _commit): the
    # boxes are the same as without exclusivity.
    assert [o.record.box for o in outputs] == [o.record.box for o in shared]


def test_contested_pixels_span_the_decoders_separate_calls(sam, embedded):
    """Plain box, mask-prompted box and points rows go through three decoder calls; the
    logits that decide the contested pixels are still those of all rows together."""
    _, _, low = sam.decode(embedded, Prompts(boxes=BOXES[1:], points=None, labels=None))
    previous = low[0, 0].numpy()
    points = (np.array([[50.0, 48.0], [5.0, 90.0]]), np.array([1, 0]))
    boxes = np.array([BOXES[0], BOXES[1], [np.nan] * 4], dtype=np.float32)
    decoded = SamMaskDecoder(sam.model, exclusive=True)(
        embedded, boxes, [None, previous, None], [None, None, (points[0], points[1])]
    )
    logits = np.stack(
        [
            row_logits(sam, embedded, BOXES[0]),
            row_logits(sam, embedded, BOXES[1], mask_input=previous),
            row_logits(sam, embedded, points=points),
        ]
    )
    threshold = sam.model.mask_threshold
    own = logits > threshold
    assert np.array_equal(decoded.masks, own)  # the rows' own masks come back
    contested = np.flatnonzero(own.sum(axis=0) >= 2)
    owner = expected_owner(logits, threshold).reshape(-1)[contested]
    # Every row, from every call, claims contested pixels and wins some of them.
    assert all(own.reshape(3, -1)[row, contested].any() for row in range(3))
    assert set(owner.tolist()) == {0, 1, 2}
    # Each row's logits in its window, from whichever call decoded it: the pixels two rows
    # claim are decided by the logits of all rows together.
    assert decoded.contested is not None and decoded.contested.windows is not None
    for row, (mask, window) in enumerate(
        zip(decoded.masks, decoded.contested.windows, strict=True)
    ):
        rows, cols = mask.slices
        np.testing.assert_allclose(window, logits[row][rows, cols], rtol=1e-5, atol=1e-5)
    exclusive = np.stack(exclusive_masks(decoded.masks, decoded.contested, [0, 0, 0]))
    assert exclusive.sum(axis=0).max() == 1
    assert np.array_equal(exclusive.any(axis=0), own.any(axis=0))
    owner = np.where(exclusive.any(axis=0), exclusive.argmax(axis=0), -1)
    assert np.array_equal(owner, expected_owner(logits, threshold))


def test_not_exclusive_reports_no_contested_pixels(sam, embedded):
    decoded = SamMaskDecoder(sam.model, exclusive=False)(embedded, BOXES, [None, None])
    assert decoded.contested is None
    assert (decoded.masks[0].dense() & decoded.masks[1].dense()).any()


def run_node(sam: SAM, checkpoint: Path, sizes: list[tuple[int, int]], **config: bool) -> list:
    prompts = tuple(PromptConfig(box=tuple(float(v) for v in box)) for box in BOXES)
    tracker_config = TrackerConfig(
        device="cpu", prompts=prompts, min_score=0.0, min_agreement=0.0, **config
    )
    node = TrackerNode(tracker_config, weights=str(checkpoint), image_size=256)
    node.setup()
    messages = [
        node.process(sam_embedding_message(sam, frame, size))[0] for frame, size in enumerate(sizes)
    ]
    assert node.counters["frame_size_changes"] == 1
    return messages


def test_tracker_node_publishes_exclusive_masks_through_a_resolution_change(sam, checkpoint):
    """The node as the pipeline runs it (config -> SamMaskDecoder -> PromptTracker): masks
    never overlap by default, overlap with exclusive_masks false, and a mid-stream size
    change keeps the frames flowing at the new size."""
    assert TrackerConfig().exclusive_masks  # the documented default
    sizes = [SIZE] * 3 + [(2 * SIZE[0], 2 * SIZE[1])] * 3
    exclusive = run_node(sam, checkpoint, sizes)
    shared = run_node(sam, checkpoint, sizes, exclusive_masks=False)
    for size, one, other in zip(sizes, exclusive, shared, strict=True):
        for msg in (one, other):
            assert isinstance(msg, MaskMessage)
            assert msg.frame_size == size and msg.dense_masks().shape == (2, *size)
        assert [t.state for t in one.tracks] == [t.state for t in other.tracks]
        assert all(t.state in ("tentative", "tracked") for t in one.tracks)
        apart, overlapping = one.dense_masks(), other.dense_masks()
        assert apart.sum(axis=0).max() == 1 and overlapping.sum(axis=0).max() == 2
        assert np.array_equal(apart.any(axis=0), overlapping.any(axis=0))
    # The tracks carried over the change: the first boxes at the new size are about twice
    # the last ones at the old size.
    before, after = exclusive[2].tracks, exclusive[3].tracks
    for old, new in zip(before, after, strict=True):
        assert np.allclose(new.box, 2 * np.array(old.box), atol=8.0)
