"""The tracker's mask decoder backends: parity with MobileSAM.decode in fp32, the tracker
node on ONNX Runtime, `tracker.backend: auto`'s calibration and its cache.

At 256 px on the random-weight checkpoint (16x16 embeddings, 64x64 low-res logits), so the
module runs in seconds. Tolerance: low-res logits within 1e-4 relative (Frobenius norm) of
torch fp32 (`mask_decoder.TOLERANCE`; measured 5e-7 to 9e-7), and the masks equal
wherever the reference logit is not within 1e-3 of the threshold.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, TrackerConfig, config_from_dict
from pipeline.infer import calibration, export, mask_decoder
from pipeline.infer.backend import installed, relative_error
from pipeline.infer.mask_decoder import (
    TOLERANCE,
    TorchMaskDecoder,
    build_mask_decoder,
    calibration_prompts,
)
from pipeline.predictor import SAM

SIZE = 256
NEAR_THRESHOLD = 1e-3  # |logit| below this may flip between backends; nowhere else may
HAS_OPENVINO = installed("openvino")
HAS_ORT = installed("onnxruntime")


def _installed_backends() -> list:
    ov = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
    ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
    return ["torch", pytest.param("onnxruntime", marks=ort), pytest.param("openvino", marks=ov)]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own cache: no calibration leaks between tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAMSTREAM_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SAM:
    return SAM(checkpoint, image_size=SIZE)


@pytest.fixture(scope="module")
def shared_cache(sam: SAM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the checkpoint's exported decoder: exported once for the module."""
    cache = tmp_path_factory.mktemp("decoder-cache")
    export.cached_onnx(
        sam.model,
        kind=export.DECODER,
        checkpoint_sha256=export.file_sha256(sam.weights_path),
        cache=cache,
    )
    return cache


@pytest.fixture
def seeded(shared_cache: Path, _cache: Path) -> Path:
    """This test's cache with the decoder export already in it."""
    shutil.copytree(shared_cache / "onnx", _cache / "onnx")
    return _cache


@pytest.fixture(scope="module")
def decoders(sam: SAM, shared_cache: Path) -> dict[str, mask_decoder.MaskDecoderBackend]:
    """Every installed backend, built once for the module (sessions load in ~0.1 s)."""
    out: dict[str, mask_decoder.MaskDecoderBackend] = {}
    for name in ("torch", "onnxruntime", "openvino"):
        if installed(name):
            out[name] = build_mask_decoder(
                model=sam.model, weights_path=sam.weights_path, backend=name, cache=shared_cache
            )
    return out


def _assert_matches(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]
) -> None:
    low, scores = (t.cpu().numpy() for t in got)
    ref_low, ref_scores = (t.cpu().numpy() for t in want)
    assert low.shape == ref_low.shape and scores.shape == ref_scores.shape
    assert low.dtype == np.float32 and scores.dtype == np.float32
    assert relative_error(low, ref_low) <= TOLERANCE
    assert relative_error(scores, ref_scores) <= TOLERANCE
    clear = np.abs(ref_low) >= NEAR_THRESHOLD
    assert np.array_equal((low > 0)[clear], (ref_low > 0)[clear])


@pytest.mark.parametrize("backend", _installed_backends())
@pytest.mark.parametrize("count", [1, 3, 8])
@pytest.mark.parametrize("with_mask", [False, True])
def test_boxes_match_torch_fp32(
    sam: SAM, decoders: dict, backend: str, count: int, with_mask: bool
) -> None:
    embedding, boxes, masks = calibration_prompts(sam.model, count, seed=count)
    reference = TorchMaskDecoder(model=sam.model, exact=True)
    mask_input = masks if with_mask else None
    want = reference.decode(embedding, boxes=boxes, mask_input=mask_input)
    got = decoders[backend].decode(embedding, boxes=boxes, mask_input=mask_input)
    assert got[0].shape == (count, 1, 64, 64) and got[1].shape == (count, 1)
    _assert_matches(got, want)


@pytest.mark.parametrize("backend", _installed_backends())
@pytest.mark.parametrize("with_box", [False, True])
def test_points_match_torch_fp32(sam: SAM, decoders: dict, backend: str, with_box: bool) -> None:
    """Points prompts (a track's first frame): foreground and background points, alone
    (one padding token) or with a box, with and without a mask prompt."""
    embedding, boxes, masks = calibration_prompts(sam.model, 3, seed=5)
    coords = np.array([[[60.0, 80.0], [120.0, 40.0]]] * 3, np.float32) + np.arange(3)[:, None, None]
    labels = np.array([[1, 0]] * 3, np.int32)
    reference = TorchMaskDecoder(model=sam.model, exact=True)
    for mask_input in (None, masks):
        kwargs = {"points": (coords, labels), "boxes": boxes if with_box else None}
        want = reference.decode(embedding, mask_input=mask_input, **kwargs)
        got = decoders[backend].decode(embedding, mask_input=mask_input, **kwargs)
        _assert_matches(got, want)


def test_exact_torch_is_sam_decode_bit_for_bit(sam: SAM, real_image: np.ndarray) -> None:
    """What SamMaskDecoder runs when given no backend: SAM.decode's low-res logits."""
    from pipeline.model.transforms import scale_boxes
    from pipeline.prompts import parse_prompts

    embedded = sam.set_image(real_image)
    box = [[50.0, 40.0, 300.0, 280.0], [200.0, 10.0, 500.0, 330.0]]
    _, scores, low = sam.decode(embedded, parse_prompts(real_image.shape[:2], bboxes=box))
    scaled = scale_boxes(np.array(box, np.float32), real_image.shape[:2], SIZE)
    got_low, got_scores = TorchMaskDecoder(model=sam.model, exact=True).decode(
        embedded.embedding, boxes=scaled
    )
    assert torch.equal(got_low, low) and torch.equal(got_scores, scores)


def _frames(count: int) -> list:
    """Embedding messages of a 342x480 stream: a fixed random embedding drifting a little
    from frame to frame (no encoder run: the tracker is what is tested)."""
    from pipeline.wire.messages import EmbeddingMessage, FrameMeta

    rng = np.random.default_rng(7)
    embedding = rng.standard_normal((256, 16, 16)).astype(np.float32)
    out = []
    for i in range(count):
        embedding = embedding + 0.05 * rng.standard_normal(embedding.shape).astype(np.float32)
        meta = FrameMeta("cam0", i, i, i, (1, 25), 100.0 + i / 25)
        out.append(
            EmbeddingMessage(
                meta=meta,
                embedding=embedding.copy(),
                embedding_dtype="float32",
                original_size=(342, 480),
                input_size=(182, 256),
            )
        )
    return out


def _node(checkpoint: Path, backend: str):
    from nodes.tracker import TrackerNode
    from pipeline.config import PromptConfig

    prompts = (
        PromptConfig(box=(40.0, 30.0, 200.0, 250.0)),
        PromptConfig(box=(180.0, 60.0, 400.0, 320.0)),
        PromptConfig(points=((300.0, 150.0), (100.0, 100.0)), labels=(1, 0)),
    )
    config = TrackerConfig(
        device="cpu", prompts=prompts, backend=backend, min_score=0.0, min_agreement=0.0
    )
    node = TrackerNode(config, weights=str(checkpoint), image_size=SIZE)
    node.setup()
    return node


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_tracker_node_on_onnxruntime_gives_torchs_masks(checkpoint: Path, seeded: Path) -> None:
    """Boxes, a points prompt, then mask prompts fed back frame after frame: the same
    tracks, states and boxes as the torch backend, and the same masks but for the odd
    pixel whose logit is within float32 noise (~1e-5) of the threshold."""
    nodes = {name: _node(checkpoint, name) for name in ("torch", "onnxruntime")}
    assert nodes["onnxruntime"].detail["backend"]["backend"] == "onnxruntime"
    assert nodes["torch"].detail["backend"]["backend"] == "torch"
    json.dumps(nodes["onnxruntime"].detail)  # travels in status messages
    flipped = total = 0
    for msg in _frames(4):
        [a], [b] = (node.process(msg) for node in nodes.values())
        assert [t.track_id for t in a.tracks] == [t.track_id for t in b.tracks]
        assert [t.state for t in a.tracks] == [t.state for t in b.tracks]
        for ta, tb in zip(a.tracks, b.tracks, strict=True):
            assert np.allclose(ta.box, tb.box, atol=1.0) and abs(ta.score - tb.score) < 1e-4
        for ma, mb in zip(a.masks, b.masks, strict=True):
            flipped += int((ma.dense() != mb.dense()).sum())
            total += int(ma.dense().sum())
    assert total > 1000  # the masks are not empty
    assert flipped <= 1e-3 * total


@pytest.fixture
def fast_calibration(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One timed round (tests check the mechanism, not the timings); counts calibrations."""
    monkeypatch.setattr(calibration, "CALIBRATION_ROUNDS", 1)
    calls: list[int] = []
    real = calibration.calibrate  # the encoder's and the mask decoder's

    def counting(cal: calibration.Calibration, *args, **kwargs):
        calls.append(1)
        assert cal.name == export.DECODER
        return real(cal, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counting)
    return calls


def _auto(sam: SAM) -> dict:
    return build_mask_decoder(model=sam.model, weights_path=sam.weights_path, backend="auto").report


def test_auto_calibrates_once_and_reuses_the_result(
    sam: SAM, seeded: Path, fast_calibration: list[int]
) -> None:
    first = _auto(sam)
    assert fast_calibration == [1] and first["chosen_by"] == "calibration"
    rows = {r["backend"]: r for r in first["candidates"]}
    assert set(rows) == {"torch", "onnxruntime", "openvino"}
    for row in rows.values():
        if "skipped" in row:
            continue
        assert row["ok"] and row["rel_error"] <= TOLERANCE and row["first_ms"] > 0
        if row["ms"] is None:  # far slower on its first runs: never timed, and says so
            assert row["dropped"].startswith("first run") and row["runs"] == 0
            continue
        assert (
            row["ms_1"] > 0
            and row["ms_8"] > 0
            and row["ms"] == pytest.approx(row["ms_1"] + row["ms_8"], abs=0.02)
        )
    timed = [r["ms"] for r in rows.values() if r.get("ok") and r["ms"] is not None]
    assert rows[first["backend"]]["ms"] == min(timed) and first["precision"] == "float32"
    [path] = (seeded / "calibration").glob("mask_decoder-*.json")
    assert Path(first["calibration_file"]) == path
    second = _auto(sam)
    assert fast_calibration == [1] and second["chosen_by"] == "calibration cache"
    assert second["backend"] == first["backend"] and second["candidates"] == first["candidates"]


def test_a_corrupt_calibration_is_redone_with_a_warning(
    sam: SAM, seeded: Path, fast_calibration: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    _auto(sam)
    [path] = (seeded / "calibration").glob("mask_decoder-*.json")
    for garbage in ('{"key": ', json.dumps({"key": None, "choice": {"backend": "tensorrt"}})):
        path.write_text(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.infer.calibration"):
            report = _auto(sam)
        assert report["chosen_by"] == "calibration"
    assert fast_calibration == [1, 1, 1]
    key = json.loads(path.read_text())["key"]
    assert key["format"] == calibration.CALIBRATION_FORMAT and key["kind"] == export.DECODER
    assert key == _decoder_key(threads=key["threads"], checkpoint_sha256=key["checkpoint_sha256"])


def _decoder_key(**change: object) -> dict:
    """The mask decoder's calibration key (pipeline.infer.mask_decoder.MaskDecoderBuilder's
    settings)."""
    args = {"image_size": SIZE, "threads": 1, "checkpoint_sha256": "a" * 64, **change}
    settings = {"counts": list(mask_decoder.CALIBRATION_COUNTS), "tolerance": TOLERANCE}
    return calibration.calibration_key(export.DECODER, **args, **settings)  # type: ignore[arg-type]


def test_a_calibration_for_another_key_is_never_used(sam: SAM) -> None:
    key = _decoder_key()
    assert {"cpu_model", "cpu_flags_sha256", "versions", "tolerance"} <= key.keys()
    for change in ({"threads": 2}, {"image_size": 512}, {"checkpoint_sha256": "b" * 64}):
        assert _decoder_key(**change) != key
    encoder_key = calibration.calibration_key(
        export.ENCODER, image_size=SIZE, threads=1, checkpoint_sha256="a" * 64
    )
    assert encoder_key["kind"] != key["kind"]  # the two never read each other's files


def test_auto_without_openvino_uses_what_is_there(
    sam: SAM, seeded: Path, monkeypatch: pytest.MonkeyPatch, fast_calibration: list[int]
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` -> ImportError
    report = _auto(sam)
    rows = {r["backend"]: r for r in report["candidates"]}
    assert report["backend"] in ("torch", "onnxruntime")
    assert "samstream[openvino]" in rows["openvino"]["skipped"]


def test_openvino_missing_names_the_extra(sam: SAM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeError, match=r"tracker\.backend openvino .*samstream\[openvino\]"):
        build_mask_decoder(model=sam.model, weights_path=sam.weights_path, backend="openvino")


def test_bad_backend_arguments(sam: SAM) -> None:
    with pytest.raises(ValueError, match="not one of auto"):
        build_mask_decoder(model=sam.model, weights_path=sam.weights_path, backend="tensorrt")


def test_config_backend_key() -> None:
    assert config_from_dict({}).tracker.backend == "auto"
    for name in ("torch", "onnxruntime", "openvino"):
        assert config_from_dict({"tracker": {"backend": name}}).tracker.backend == name
    with pytest.raises(ConfigError, match=r"tracker\.backend: must be auto \| torch"):
        config_from_dict({"tracker": {"backend": "tensorrt"}})
    with pytest.raises(ConfigError, match=r"tracker\.threads: must be at least 1"):
        config_from_dict({"tracker": {"threads": 0}})


def test_threads_come_from_the_budget(
    sam: SAM, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the launcher sets for the tracker
    decoder = build_mask_decoder(
        model=sam.model, weights_path=sam.weights_path, backend="onnxruntime", cache=shared_cache
    )
    assert decoder.threads == 1 and decoder.report["threads"] == 1
    assert decoder.onnx.session.get_session_options().intra_op_num_threads == 1
    if HAS_OPENVINO:
        decoder = build_mask_decoder(
            model=sam.model,
            weights_path=sam.weights_path,
            backend="openvino",
            threads=2,
            cache=shared_cache,
        )
        assert decoder.onnx.compiled.get_property("INFERENCE_NUM_THREADS") == 2
