"""The decoder-only model (`SamDecoder`): what the tracker builds instead of a whole MobileSAM.

It holds the checkpoint's prompt encoder + mask decoder weights and nothing of TinyViT, and
every output is bit for bit what the whole model's decode path gives: the model's own
decode, the tracker's batched decoder (exact and reordered torch backends), the tracker node
frame by frame, and the ONNX decoder export.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.layers
import torch
from support.trackers import sam_embedding_message

from nodes.tracker import TrackerNode
from pipeline.config import PromptConfig, TrackerConfig
from pipeline.infer import export
from pipeline.infer.mask_decoder import (
    SamMaskDecoder,
    TorchMaskDecoder,
    build_mask_decoder,
    calibration_prompts,
)
from pipeline.model import image_encoder
from pipeline.model.checkpoint import CheckpointError, load_sam_decoder
from pipeline.model.common import LayerNorm2d
from pipeline.model.sam import MobileSAM, SamDecoder
from pipeline.predictor import SAM

SIZE = 256
FRAME = (96, 128)  # H, W
BOXES = np.array([[0, 0, 64, 96], [40, 0, 128, 96]], dtype=np.float32)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMSTREAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SAM:
    return SAM(checkpoint, device="cpu", image_size=SIZE)


@pytest.fixture(scope="module")
def decoder_model(checkpoint: Path) -> SamDecoder:
    return load_sam_decoder(checkpoint, img_size=SIZE).eval()


def test_holds_exactly_the_decoder_weights_of_the_whole_model(sam, decoder_model) -> None:
    assert type(decoder_model) is SamDecoder and not hasattr(decoder_model, "image_encoder")
    whole = sam.model.state_dict()
    ours = decoder_model.state_dict()
    assert set(ours) == {k for k in whole if not k.startswith("image_encoder.")}
    for key, value in ours.items():
        assert torch.equal(value, whole[key]), key
    assert (decoder_model.img_size, decoder_model.embedding_size) == (SIZE, SIZE // 16)
    assert decoder_model.device == torch.device("cpu")


def test_tracker_setup_builds_no_image_encoder(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_tinyvit(*args, **kwargs):
        raise AssertionError("the tracker built a TinyViT")

    monkeypatch.setattr(image_encoder, "TinyViTEncoder", no_tinyvit)
    node = TrackerNode(
        TrackerConfig(device="cpu", backend="torch"), weights=str(checkpoint), image_size=SIZE
    )
    node.setup()
    assert node.decoder is not None and type(node.decoder.model) is SamDecoder
    assert node.detail["backend"]["backend"] == "torch"


def test_the_tracker_node_starts_without_timm() -> None:
    """timm (with torchvision and torch._dynamo) is 2-3 s of every start on a CPU: only
    the image encoder needs it, and the tracker builds none."""
    code = "import sys, nodes.tracker; print(sorted({'timm', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_layer_norm_2d_is_timms_bit_for_bit() -> None:
    ours, timms = LayerNorm2d(32, eps=1e-6), timm.layers.LayerNorm2d(32, eps=1e-6)
    with torch.no_grad():
        timms.weight.normal_()
        timms.bias.normal_()
    ours.load_state_dict(timms.state_dict())  # the same keys: weight, bias
    x = torch.randn(2, 32, 17, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(x), timms(x))


def test_decode_is_the_whole_models_bit_for_bit(sam, decoder_model) -> None:
    embedding, boxes, masks = calibration_prompts(decoder_model, 5, seed=3)
    points = (torch.tensor([[[30.0, 40.0], [100.0, 90.0]]]), torch.tensor([[1, 0]]))
    with torch.inference_mode():
        for prompts in (
            {"boxes": torch.from_numpy(boxes)},
            {"boxes": torch.from_numpy(boxes), "mask_inputs": masks},
            {"points": points},
            {"points": points, "multimask_output": True},
        ):
            got = decoder_model.decode(embedding, **prompts)
            expected = sam.model.decode(embedding, **prompts)
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b)
            low = got[0]
            assert torch.equal(
                decoder_model.upscale_masks(low, (192, 256), FRAME),
                sam.model.upscale_masks(low, (192, 256), FRAME),
            )


@pytest.mark.parametrize("exact", [True, False])
def test_torch_backends_are_the_whole_models_bit_for_bit(sam, decoder_model, exact) -> None:
    embedding, boxes, masks = calibration_prompts(decoder_model, 4, seed=4)
    got = TorchMaskDecoder(model=decoder_model, exact=exact).decode(
        embedding, boxes=boxes, mask_input=masks
    )
    expected = TorchMaskDecoder(model=sam.model, exact=exact).decode(
        embedding, boxes=boxes, mask_input=masks
    )
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_batched_decoder_is_the_sam_paths_bit_for_bit(sam, decoder_model) -> None:
    """SamMaskDecoder on the decoder-only model (no backend: SamDecoder.decode) against
    SamMaskDecoder on a whole MobileSAM: masks, windows, scores, low-res and contested logits."""
    image = np.random.default_rng(0).integers(0, 256, (*FRAME, 3), dtype=np.uint8)
    embedded = sam.set_image(image)
    previous = np.random.default_rng(1).normal(0, 4, (64, 64)).astype(np.float32)
    points = [None, None, (np.array([[60.0, 50.0]], np.float32), np.array([1], np.int32))]
    boxes = np.concatenate([BOXES, np.full((1, 4), np.nan, np.float32)])
    results = []
    for model in (decoder_model, sam.model):
        decoder = SamMaskDecoder(model, exclusive=True)
        results.append(decoder(embedded, boxes, [None, previous, None], points))
    got, expected = results
    assert np.array_equal(got.scores, expected.scores)
    assert np.array_equal(got.low_res_logits, expected.low_res_logits)
    for a, b in zip(got.masks, expected.masks, strict=True):
        assert a.box == b.box and np.array_equal(a.dense(), b.dense())
    for a, b in zip(got.contested.windows, expected.contested.windows, strict=True):
        assert np.array_equal(a, b)
    assert sum(int(m.dense().sum()) for m in got.masks) > 0  # not all empty


def test_tracker_node_is_the_whole_model_trackers_bit_for_bit(sam, checkpoint: Path) -> None:
    """The node as set up now (decoder-only model) against the node as it was set up before
    (a whole SAM, its backend built from the MobileSAM), over frames that feed each mask back
    as the next frame's prompt."""
    prompts = tuple(PromptConfig(box=tuple(float(v) for v in box)) for box in BOXES)
    config = TrackerConfig(
        device="cpu", backend="torch", prompts=prompts, min_score=0.0, min_agreement=0.0
    )
    new = TrackerNode(config, weights=str(checkpoint), image_size=SIZE)
    new.setup()
    backend = build_mask_decoder(model=sam.model, weights_path=sam.weights_path, backend="torch")
    whole = SamMaskDecoder(sam.model, exclusive=config.exclusive_masks, backend=backend)
    old = TrackerNode(config, weights=str(checkpoint), image_size=SIZE, decoder=whole)
    old.setup()
    for frame in range(4):
        msg = sam_embedding_message(sam, 10 + frame, FRAME)
        [a], [b] = new.process(msg), old.process(msg)
        assert [(t.track_id, t.box, t.score, t.state) for t in a.tracks] == [
            (t.track_id, t.box, t.score, t.state) for t in b.tracks
        ]
        for ma, mb in zip(a.masks, b.masks, strict=True):
            assert ma.box == mb.box and np.array_equal(ma.dense(), mb.dense())
    assert sum(int(m.dense().sum()) for m in a.masks) > 0


def test_onnx_decoder_exports_from_the_decoder_only_model(sam, decoder_model, tmp_path) -> None:
    """The same ONNX file, byte for byte, from the decoder-only model as from MobileSAM; the
    encoder export needs the whole model."""
    ours, theirs = tmp_path / "decoder_only.onnx", tmp_path / "whole.onnx"
    export.export_onnx(decoder_model, ours, kind=export.DECODER)
    export.export_onnx(sam.model, theirs, kind=export.DECODER)
    assert ours.read_bytes() == theirs.read_bytes()
    side = export.sidecar(
        decoder_model,
        kind=export.DECODER,
        checkpoint_sha256="a" * 64,
        opset=export.OPSET,
        file_sha256_hex="b" * 64,
    )
    assert side == export.sidecar(
        sam.model,
        kind=export.DECODER,
        checkpoint_sha256="a" * 64,
        opset=export.OPSET,
        file_sha256_hex="b" * 64,
    )
    with pytest.raises(TypeError, match="image_encoder export needs a MobileSAM, not a SamDecoder"):
        export.export_onnx(decoder_model, tmp_path / "encoder.onnx", kind=export.ENCODER)


def _edited(checkpoint: Path, tmp_path: Path, drop: str) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "edited.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith(drop)}, path)
    return path


@pytest.mark.parametrize("network", ["mask_decoder.", "prompt_encoder."])
def test_a_checkpoint_without_decoder_weights_fails_naming_them(
    checkpoint: Path, tmp_path: Path, network: str
) -> None:
    path = _edited(checkpoint, tmp_path, network)
    with pytest.raises(
        CheckpointError, match=rf"edited\.pt is missing \d+ key\(s\), first: '{network}"
    ):
        load_sam_decoder(path, img_size=SIZE)
    node = TrackerNode(
        TrackerConfig(device="cpu", backend="torch"), weights=str(path), image_size=SIZE
    )
    with pytest.raises(CheckpointError, match=rf"missing .* first: '{network}"):
        node.setup()


def test_the_image_encoder_weights_are_not_needed(checkpoint: Path, tmp_path: Path) -> None:
    path = _edited(checkpoint, tmp_path, "image_encoder.")
    model = load_sam_decoder(path, img_size=SIZE)
    assert isinstance(model, SamDecoder) and not isinstance(model, MobileSAM)
    with pytest.raises(CheckpointError, match=r"missing \d+ key\(s\), first: 'image_encoder\."):
        SAM(path, device="cpu", image_size=SIZE)
