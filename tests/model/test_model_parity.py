"""Parity with the official MobileSAM code (the `mobilesam-mirror` oracle), same weights, fp32 CPU.

Tolerances: image embedding relative error <= 1e-5; low-res logits and scores <= 1e-4; full-size
masks identical except where the oracle's logit is within 1e-3 of the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import SAM

EMBEDDING_TOL = 1e-5
DECODER_TOL = 1e-4
MASK_MARGIN = 1e-3


def rel_error(ours: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    ours_t = torch.as_tensor(np.asarray(ours), dtype=torch.float64)
    ref_t = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return float((ours_t - ref_t).norm() / ref_t.norm())


@pytest.fixture(scope="module")
def sam(checkpoint) -> SAM:
    return SAM(checkpoint)


@pytest.fixture(scope="module")
def oracle_predictor(oracle_model, real_image):
    import mobile_sam

    predictor = mobile_sam.SamPredictor(oracle_model)
    predictor.set_image(real_image)
    return predictor


@pytest.fixture(scope="module")
def embedded(sam, real_image):
    return sam.set_image(real_image)


def oracle_predict(predictor, *, boxes=None, points=None, labels=None, multimask=False):
    """The oracle's predict_torch on prompts in original-image pixels (batched like ours)."""
    size = predictor.original_size
    kwargs = {}
    if boxes is not None:
        boxes = predictor.transform.apply_boxes(np.asarray(boxes, dtype=np.float32), size)
        kwargs["boxes"] = torch.as_tensor(boxes, dtype=torch.float32)
    if points is not None:
        coords = predictor.transform.apply_coords(np.asarray(points, dtype=np.float32), size)
        kwargs["point_coords"] = torch.as_tensor(coords, dtype=torch.float32)
        kwargs["point_labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    else:
        kwargs["point_coords"] = kwargs["point_labels"] = None
    with torch.inference_mode():
        logits, scores, low_res = predictor.predict_torch(
            multimask_output=multimask, return_logits=True, **kwargs
        )
    return logits.numpy(), scores.numpy(), low_res.numpy()


def test_image_embedding_matches_oracle(embedded, oracle_predictor):
    assert embedded.embedding.shape == (1, 256, 64, 64)
    assert embedded.input_size == oracle_predictor.input_size
    err = rel_error(embedded.embedding, oracle_predictor.features)
    print(f"embedding relative error {err:.2e}")
    assert err <= EMBEDDING_TOL


# Prompts in original pixels on the 548x342 image, each in our (Ultralytics) nesting and in the
# oracle's batched form: boxes Nx4, points NxPx2 with labels NxP.
CASES = {
    "one box": dict(ours=dict(bboxes=[200, 40, 330, 330]), ref=dict(boxes=[[200, 40, 330, 330]])),
    "several boxes": dict(
        ours=dict(bboxes=[[200, 40, 330, 330], [10, 200, 150, 330], [400, 20, 540, 120]]),
        ref=dict(boxes=[[200, 40, 330, 330], [10, 200, 150, 330], [400, 20, 540, 120]]),
    ),
    "one point": dict(
        ours=dict(points=[260, 150], labels=[1]),
        ref=dict(points=[[[260, 150]]], labels=[[1]]),
    ),
    "points of one object": dict(
        ours=dict(points=[[[260, 150], [270, 250], [100, 300]]], labels=[[1, 1, 0]]),
        ref=dict(points=[[[260, 150], [270, 250], [100, 300]]], labels=[[1, 1, 0]]),
    ),
    "one object per point": dict(
        ours=dict(points=[[260, 150], [60, 260]], labels=[1, 1]),
        ref=dict(points=[[[260, 150]], [[60, 260]]], labels=[[1], [1]]),
    ),
    "box and points": dict(
        ours=dict(bboxes=[200, 40, 330, 330], points=[[260, 150], [120, 300]], labels=[1, 0]),
        ref=dict(boxes=[[200, 40, 330, 330]], points=[[[260, 150], [120, 300]]], labels=[[1, 0]]),
    ),
}


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("case", list(CASES))
def test_decoder_matches_oracle(sam, embedded, oracle_predictor, case, multimask):
    from pipeline.prompts import parse_prompts

    prompts = parse_prompts(embedded.original_size, **CASES[case]["ours"])
    logits, scores, low_res = sam.decode(embedded, prompts, multimask_output=multimask)
    ref_logits, ref_scores, ref_low_res = oracle_predict(
        oracle_predictor, multimask=multimask, **CASES[case]["ref"]
    )
    assert low_res.shape == ref_low_res.shape
    assert low_res.shape[-2:] == (256, 256)
    low_err, score_err = rel_error(low_res, ref_low_res), rel_error(scores, ref_scores)
    print(f"{case} multimask={multimask}: logits {low_err:.2e} scores {score_err:.2e}")
    assert low_err <= DECODER_TOL
    assert score_err <= DECODER_TOL
    # Upscaled to the original size, the logits must still agree.
    assert logits.shape == ref_logits.shape
    assert rel_error(logits, ref_logits) <= DECODER_TOL


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_full_path_masks_match_sam_predictor(sam, real_image, oracle_predictor, multimask):
    """predict() end to end (pre-processing, decode, upscaling) against SamPredictor.predict."""
    box = np.array([200, 40, 330, 330], dtype=np.float32)
    point, label = np.array([[260, 150], [120, 300]]), np.array([1, 0])
    [result] = sam.predict(
        real_image, bboxes=box, points=point, labels=label, multimask_output=multimask
    )
    ref_logits, ref_scores, ref_low_res = oracle_predictor.predict(
        point_coords=point,
        point_labels=label,
        box=box,
        multimask_output=multimask,
        return_logits=True,
    )
    count = 3 if multimask else 1
    h, w = real_image.shape[:2]
    assert result.masks.data.shape == (count, h, w) and result.masks.data.dtype == bool
    assert result.scores.shape == (count,)
    assert result.logits.shape == (count, 256, 256)
    ambiguous = np.abs(ref_logits) <= MASK_MARGIN
    differing = (result.masks.data != (ref_logits > 0)) & ~ambiguous
    assert not differing.any(), f"{differing.sum()} mask pixels differ away from the threshold"
    assert rel_error(result.scores, ref_scores) <= DECODER_TOL
    assert rel_error(result.logits, ref_low_res) <= DECODER_TOL
