"""ONNX export: `samstream export` writes two checked models with sidecars that match PyTorch.

Exported once per module at 256 px (fast); compared in ONNX Runtime against the PyTorch
model on the same inputs. Measured here: embeddings ~1e-6 relative, decoder logits ~1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.infer.backend import relative_error
from pipeline.infer.decoder_graph import onnx_prompts
from pipeline.infer.encoder import preprocess
from pipeline.infer.export import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    OPSET,
    file_sha256,
    samstream_version,
)
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.sam import MobileSAM, build_mobile_sam
from pipeline.model.transforms import resize_longest_side

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = 256
TOLERANCE = 1e-4  # fp32, relative (Frobenius norm)


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("onnx")
    code = main(
        ["export", "--weights", str(checkpoint), "--image-size", str(SIZE), "--out", str(out)]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> MobileSAM:
    sam = build_mobile_sam(img_size=SIZE)
    load_checkpoint(sam, checkpoint)
    return sam.eval()


@pytest.fixture(scope="module")
def decoder(exported: Path) -> ort.InferenceSession:
    return _session(exported / f"mobile_sam_mask_decoder_{SIZE}.onnx")


@pytest.fixture(scope="module")
def embedding(model: MobileSAM, real_image: np.ndarray) -> torch.Tensor:
    """The real image's 1xCxhxw embedding by the PyTorch encoder."""
    x = preprocess(resize_longest_side(real_image, SIZE)[None], SIZE)
    with torch.no_grad():
        return model.image_encoder(torch.from_numpy(x))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_checked_models_and_sidecars(exported: Path, checkpoint: Path) -> None:
    digest = file_sha256(checkpoint)
    for kind, inputs, outputs in (
        ("image_encoder", ENCODER_INPUTS, ENCODER_OUTPUTS),
        ("mask_decoder", DECODER_INPUTS, DECODER_OUTPUTS),
    ):
        path = exported / f"mobile_sam_{kind}_{SIZE}.onnx"
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path)).graph
        assert tuple(i.name for i in graph.input) == inputs
        assert tuple(o.name for o in graph.output) == outputs
        info = json.loads(path.with_suffix(".json").read_text())
        assert info["model"] == kind and info["image_size"] == SIZE
        assert info["checkpoint_sha256"] == digest
        assert info["samstream_version"] == samstream_version()
        assert info["opset"] == OPSET == graph_opset(path)
        assert [i["name"] for i in info["inputs"]] == list(inputs)
        assert [o["name"] for o in info["outputs"]] == list(outputs)
        assert info["file_sha256"] == file_sha256(path)
    enc = json.loads((exported / f"mobile_sam_image_encoder_{SIZE}.json").read_text())
    assert enc["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE]
    assert enc["outputs"][0]["shape"] == ["batch", 256, SIZE // 16, SIZE // 16]


def graph_opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("batch", [1, 2])
def test_encoder_matches_torch_with_a_dynamic_batch(
    exported: Path, model: MobileSAM, real_image: np.ndarray, batch: int
) -> None:
    resized = resize_longest_side(real_image, SIZE)
    frames = np.stack([resized, resized[:, ::-1]][:batch])
    x = preprocess(frames, SIZE)
    with torch.no_grad():
        expected = model.image_encoder(torch.from_numpy(x)).numpy()
        # The host preprocessing is the model's own, bit for bit.
        ours = model.preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_array_equal(x, ours)
    session = _session(exported / f"mobile_sam_image_encoder_{SIZE}.onnx")
    got = session.run(None, {"images": x})[0]
    assert got.shape == (batch, 256, SIZE // 16, SIZE // 16)
    error = relative_error(got, expected)
    print(f"encoder ONNX vs torch, batch {batch}: relative error {error:.2e}")
    assert error <= TOLERANCE


def _torch_decode(model: MobileSAM, embedding: torch.Tensor, points, boxes, masks):
    with torch.no_grad():
        logits, scores = model.decode(
            embedding,
            points=None
            if points is None
            else (torch.from_numpy(points[0]), torch.from_numpy(points[1]).long()),
            boxes=None if boxes is None else torch.from_numpy(boxes),
            mask_inputs=None if masks is None else torch.from_numpy(masks),
        )
    return logits.numpy(), scores.numpy()


@pytest.mark.parametrize("prompts", [1, 3])
@pytest.mark.parametrize("case", ["box", "points", "box+points", "box+mask", "points+mask"])
def test_decoder_matches_torch(
    decoder: ort.InferenceSession,
    model: MobileSAM,
    embedding: torch.Tensor,
    case: str,
    prompts: int,
) -> None:
    rng = np.random.default_rng(prompts)
    corners = np.sort(rng.uniform(0, SIZE, (prompts, 2, 2)), axis=1)
    boxes = corners.transpose(0, 2, 1).reshape(prompts, 4).astype(np.float32)  # x1 y1 x2 y2
    points = (
        rng.uniform(0, SIZE, (prompts, 2, 2)).astype(np.float32),
        rng.integers(0, 2, (prompts, 2)).astype(np.float32),
    )
    low = 4 * (SIZE // 16)
    masks = rng.normal(0, 4, (prompts, 1, low, low)).astype(np.float32) if "mask" in case else None
    use_points = points if "points" in case else None
    use_boxes = boxes if "box" in case else None
    expected, expected_scores = _torch_decode(model, embedding, use_points, use_boxes, masks)

    coords, labels = onnx_prompts(points=use_points, boxes=use_boxes)
    got, scores = decoder.run(
        None,
        {
            "image_embeddings": embedding.numpy(),
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": masks if masks is not None else np.zeros((1, 1, low, low), np.float32),
            "has_mask_input": np.array([0.0 if masks is None else 1.0], np.float32),
        },
    )
    assert got.shape == (prompts, 1, low, low) and scores.shape == (prompts, 1)
    error = relative_error(got, expected)
    print(f"decoder ONNX vs torch, {case}, {prompts} prompt(s): relative error {error:.2e}")
    assert error <= TOLERANCE
    assert relative_error(scores, expected_scores) <= TOLERANCE
    certain = np.abs(expected) >= 1e-3
    np.testing.assert_array_equal((got > 0)[certain], (expected > 0)[certain])


def test_onnx_prompts_order_and_padding() -> None:
    coords, labels = onnx_prompts(boxes=np.array([[1, 2, 3, 4]], np.float32))
    assert coords.tolist() == [[[1, 2], [3, 4]]] and labels.tolist() == [[2, 3]]
    coords, labels = onnx_prompts(points=(np.ones((2, 1, 2), np.float32), np.ones((2, 1))))
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, -1], [1, -1]]
    with pytest.raises(ValueError, match="needs points or boxes"):
        onnx_prompts()
    with pytest.raises(ValueError, match="same number of prompts"):
        onnx_prompts(points=(np.ones((2, 1, 2)), np.ones((2, 1))), boxes=np.ones((3, 4)))


def test_export_rejects_a_bad_image_size(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    code = main(
        ["export", "--weights", str(checkpoint), "--image-size", "100", "--out", str(tmp_path)]
    )
    assert code == 2 and "multiple of 16" in capsys.readouterr().err
