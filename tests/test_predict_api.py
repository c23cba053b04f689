"""The image API users know from Ultralytics' MobileSAM page, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import SAM, Results
from pipeline.outputs.drawing import draw_overlay, track_color
from pipeline.outputs.files import decode_rle
from pipeline.prompts import parse_prompts
from pipeline.results import Masks

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def zidane(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1280x720 JPEG standing in for the seed's zidane.jpg (same size)."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, size=(720, 1280, 3), dtype=np.uint8)
    image[400:720, 420:540] = (200, 60, 40)
    path = tmp_path_factory.mktemp("images") / "zidane.jpg"
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> SAM:
    return SAM(checkpoint)


@pytest.fixture(scope="module")
def small_model(checkpoint: Path) -> SAM:
    return SAM(checkpoint, image_size=512)


def test_seed_examples_work_as_written(model: SAM, zidane: Path, monkeypatch, checkpoint) -> None:
    # The seed passes the bare name "mobile_sam.pt": found here through SAMSTREAM_WEIGHTS.
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", str(checkpoint))
    seed_model = SAM("mobile_sam.pt")
    results = seed_model.predict(str(zidane), points=[900, 370], labels=[1])
    assert isinstance(results, list) and len(results) == 1  # one Results per image
    result = results[0]
    assert result.masks.data.shape == (1, 720, 1280) and result.masks.data.dtype == bool
    assert result.scores.shape == (1,) and result.logits.shape == (1, 256, 256)
    results = seed_model.predict(str(zidane), bboxes=[439, 437, 524, 709])
    assert results[0].masks.data.shape == (1, 720, 1280)
    assert np.isfinite(results[0].scores).all()


def test_the_ultralytics_idioms_give_arrays_or_a_clear_error(small_model: SAM, zidane: Path):
    """``results[0].masks.data`` is the masks (not numpy's memoryview of an array's bytes);
    what Ultralytics has and samstream does not raises, never answers something else."""
    results = small_model(str(zidane), bboxes=[[439, 437, 524, 709], [10, 10, 200, 200]])
    masks = results[0].masks.data
    assert isinstance(masks, np.ndarray) and masks.dtype == bool and masks.shape == (2, 720, 1280)
    boxes = results[0].boxes
    assert boxes.xyxy.shape == (2, 4) and boxes.xyxy.dtype == np.float32
    assert np.array_equal(boxes.conf, results[0].scores)
    for mask, box in zip(masks, boxes.xyxy, strict=True):
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with pytest.raises(AttributeError):
        results[0].boxes.data  # noqa: B018
    with pytest.raises(AttributeError):
        masks.cpu()  # numpy already: no .cpu().numpy() needed


def test_readme_python_example_runs_as_written(
    small_model: SAM, zidane: Path, tmp_path: Path, monkeypatch, checkpoint
) -> None:
    """The README's image API snippet, run as it stands (zidane.jpg in the working directory,
    the weights found through SAMSTREAM_WEIGHTS)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Images, from Python") :]
    snippet = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    assert "results[0]" in snippet and "masks.data" in snippet
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAMSTREAM_WEIGHTS", str(checkpoint))
    (tmp_path / "zidane.jpg").write_bytes(zidane.read_bytes())
    names: dict[str, object] = {}
    exec(compile(snippet, "README.md", "exec"), names)
    assert isinstance(names["results"], list) and len(names["results"]) == 1
    assert (tmp_path / "zidane_masks.png").is_file()


def test_prompt_nesting_like_ultralytics(small_model: SAM, zidane: Path) -> None:
    image = np.asarray(Image.open(zidane))
    assert len(small_model.predict(image, points=[[100, 100], [900, 370]])[0]) == 2
    assert len(small_model.predict(image, points=[[[100, 100], [900, 370]]])[0]) == 1
    boxes = [[10, 10, 200, 200], [439, 437, 524, 709]]
    assert small_model.predict(image, bboxes=boxes)[0].masks.data.shape[0] == 2
    [multi] = small_model.predict(image, bboxes=boxes, multimask_output=True)
    assert multi.masks.data.shape[0] == 6 and multi.scores.shape == (6,)
    [one] = small_model.predict(
        image, bboxes=boxes[1], points=[[480, 500], [100, 100]], labels=[1, 0]
    )
    assert one.masks.data.shape[0] == 1


def test_parse_prompts_shapes() -> None:
    p = parse_prompts((720, 1280), points=[900, 370], labels=[1])
    assert p.points.shape == (1, 1, 2) and p.labels.tolist() == [[1]]
    p = parse_prompts((720, 1280), points=[[1, 2], [3, 4]])
    assert p.points.shape == (2, 1, 2) and p.labels.tolist() == [[1], [1]]
    p = parse_prompts((720, 1280), points=[[[1, 2], [3, 4]]], labels=[[1, 0]])
    assert p.points.shape == (1, 2, 2) and p.labels.tolist() == [[1, 0]]
    p = parse_prompts((720, 1280), bboxes=[1, 2, 30, 40], points=[[5, 6], [7, 8]], labels=[1, 0])
    assert p.boxes.shape == (1, 4) and p.points.shape == (1, 2, 2)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (dict(bboxes=[10, 10, 5, 50]), r"box 0 .*x2 \(5\) must be greater than x1 \(10\)"),
        (dict(bboxes=[10, 50, 20, 40]), r"box 0 .*y2 \(40\) must be greater than y1 \(50\)"),
        (dict(bboxes=[[1, 1, 9, 9], [1300, 10, 1400, 50]]), r"box 1 .*outside the 1280x720"),
        (dict(bboxes=[0, float("nan"), 10, 10]), r"box 0 .*NaN"),
        (dict(bboxes=[1, 2, 3]), r"bboxes must be \[x1, y1, x2, y2\]"),
        (dict(points=[[1, 2], [3, 4]], labels=[1]), r"labels \(1\) do not match points \(2\)"),
        (dict(points=[5, 5], labels=[2]), r"labels must be 1 .* or 0"),
        (dict(points=[[5, 5], [2000, 5]]), r"point 1 \[2000, 5\] lies outside"),
        (dict(points=[5, float("inf")]), r"point 0 .*NaN or infinite"),
        (dict(labels=[1]), r"labels were given without points"),
        (dict(), r"no prompt"),
        (
            dict(bboxes=[[1, 1, 9, 9], [2, 2, 8, 8]], points=[[[1, 1]], [[2, 2]], [[3, 3]]]),
            r"2 boxes and 3 point groups",
        ),
    ],
)
def test_bad_prompts_say_which_and_why(model: SAM, zidane: Path, prompt, message) -> None:
    calls = []
    hook = model.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            model.predict(str(zidane), **prompt)
    finally:
        hook.remove()
    assert not calls, "a bad prompt must be rejected before the encoder runs"


def test_bad_sources(model: SAM, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.predict(tmp_path / "missing.jpg", bboxes=[1, 1, 5, 5])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.jpg is not a readable image"):
        model.predict(junk, bboxes=[1, 1, 5, 5])
    with pytest.raises(ValueError, match=r"HxWx3 uint8 \(RGB\)"):
        model.predict(np.zeros((10, 10), dtype=np.uint8), bboxes=[1, 1, 5, 5])


def test_encode_once_decode_all_prompts_in_one_call(model: SAM, zidane: Path) -> None:
    encoder_calls, decoder_calls = [], []
    h1 = model.model.image_encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    h2 = model.model.mask_decoder.register_forward_hook(
        lambda mod, args, out: decoder_calls.append(args[2].shape[0])
    )
    try:
        boxes = [[10, 10, 200, 200], [439, 437, 524, 709], [600, 100, 700, 300]]
        model.predict(str(zidane), bboxes=boxes)
    finally:
        h1.remove()
        h2.remove()
    assert encoder_calls == [1]
    assert decoder_calls == [3]  # one batched call carrying all three prompts


@pytest.mark.parametrize(("size", "grid"), [(512, 32), (768, 48)])
def test_smaller_input_sizes_run_end_to_end(checkpoint: Path, real_image, size, grid) -> None:
    model = SAM(checkpoint, image_size=size)
    embedded = model.set_image(real_image)
    assert embedded.embedding.shape == (1, 256, grid, grid)
    assert torch.isfinite(embedded.embedding).all()
    [result] = model.predict(
        real_image, bboxes=[[200, 40, 330, 330], [10, 200, 150, 330]], multimask_output=True
    )
    h, w = real_image.shape[:2]
    assert result.masks.data.shape == (6, h, w)
    assert result.logits.shape == (6, 4 * grid, 4 * grid)
    assert np.isfinite(result.logits).all() and np.isfinite(result.scores).all()


def test_bad_model_options(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        SAM(checkpoint, image_size=1000)
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        SAM(checkpoint, dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            SAM(checkpoint, device="cuda:1")


def test_bfloat16_autocast_stays_close(checkpoint: Path, real_image) -> None:
    exact = SAM(checkpoint, image_size=512).set_image(real_image).embedding
    fast = SAM(checkpoint, image_size=512, dtype="bfloat16").set_image(real_image).embedding
    rel = float((fast - exact).norm() / exact.norm())
    assert rel < 0.05, f"bfloat16 embedding drifted {rel:.3f} from float32"


@pytest.mark.gpu
def test_cuda_matches_cpu(checkpoint: Path, real_image) -> None:
    [cpu] = SAM(checkpoint).predict(real_image, bboxes=[200, 40, 330, 330])
    [gpu] = SAM(checkpoint, device="cuda").predict(real_image, bboxes=[200, 40, 330, 330])
    err = np.linalg.norm(gpu.logits - cpu.logits) / np.linalg.norm(cpu.logits)
    assert err < 1e-3


def test_cli_predict_writes_masks_and_overlay(checkpoint: Path, zidane: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "predict",
            str(zidane),
            "--box",
            "439",
            "437",
            "524",
            "709",
            "--box",
            "10",
            "10",
            "200",
            "200",
            "--weights",
            str(checkpoint),
            "--out",
            str(out),
            "--image-size",
            "512",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mask_01.png", "mask_02.png", "overlay.png"]
    mask = np.asarray(Image.open(out / "mask_01.png"))
    assert mask.shape == (720, 1280) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / "overlay.png").size == (1280, 720)
    assert proc.stdout.count('"score"') == 2


def test_cli_predict_errors_are_one_clear_line(zidane: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "predict",
            str(zidane),
            "--box",
            "50",
            "10",
            "5",
            "20",
            "--weights",
            str(tmp_path / "none.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "none.pt does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def _two_object_results() -> Results:
    """Results with known masks: a rectangle, an L-shape, and an empty third mask."""
    image = np.full((40, 60, 3), 90, dtype=np.uint8)
    masks = np.zeros((3, 40, 60), dtype=bool)
    masks[0, 5:15, 10:30] = True
    masks[1, 20:35, 40:45] = True
    masks[1, 30:35, 40:55] = True
    return Results(
        masks=Masks(masks),
        scores=np.array([0.9, 0.5, 0.1], dtype=np.float32),
        logits=np.zeros((3, 16, 16), dtype=np.float32),
        image=image,
    )


def test_results_per_object_boxes_and_json() -> None:
    results = _two_object_results()
    assert len(results) == 3
    objects = list(results)
    assert [o.masks.data.shape for o in objects] == [(1, 40, 60)] * 3
    assert np.array_equal(results[1].masks.data[0], results.masks.data[1])
    assert np.array_equal(results[-1].masks.data, results.masks.data[2:])
    assert len(results[0:2]) == 2 and results[0:2].scores.tolist() == pytest.approx([0.9, 0.5])
    with pytest.raises(IndexError, match="out of range"):
        results[3]
    # Boxes: exclusive ends around the pixels; an empty mask has a NaN row.
    assert results.boxes.xyxy[:2].tolist() == [[10, 5, 30, 15], [40, 20, 55, 35]]
    assert np.isnan(results.boxes.xyxy[2]).all()
    assert results[1].boxes.xyxy.tolist() == [[40, 20, 55, 35]]
    assert np.array_equal(results[0:2].boxes.conf, np.array([0.9, 0.5], dtype=np.float32))
    records = json.loads(results.to_json())
    assert [r["object"] for r in records] == [1, 2, 3]
    assert records[2]["box"] is None and records[0]["box"] == [10, 5, 30, 15]
    for record, mask in zip(records, results.masks.data, strict=True):
        assert record["segmentation"]["size"] == [40, 60]
        assert np.array_equal(decode_rle(record["segmentation"]), mask)


def test_results_plot_is_the_overlay_renderer(tmp_path: Path) -> None:
    results = _two_object_results()
    expected = draw_overlay(
        results.image,
        results.masks.data,
        [1, 2, 3],
        [tuple(b) for b in results.boxes.xyxy[:2]] + [None],
    )
    plotted = results.plot()
    assert np.array_equal(plotted, expected)
    # Object 1 is id 1: inside its mask the image is tinted toward id 1's palette colour.
    inside = plotted[10, 20].astype(int)
    assert (
        np.abs(inside - np.array(track_color(1))).sum()
        < np.abs(90 - np.array(track_color(1))).sum()
    )
    assert np.array_equal(plotted[0, 0], results.image[0, 0])  # outside every mask and box
    saved = results.save(tmp_path / "plot.png")
    assert np.array_equal(np.asarray(Image.open(saved)), plotted)
    with pytest.raises(ValueError, match="cannot save results"):
        results.save(tmp_path / "plot.unknown-format")


def test_call_pil_and_bgr_sources_are_the_same_image(small_model: SAM, zidane: Path) -> None:
    rgb = np.asarray(Image.open(zidane))
    box = [439, 437, 524, 709]
    [reference] = small_model.predict(rgb, bboxes=box)
    [called] = small_model(rgb, bboxes=box)
    [from_pil] = small_model(Image.open(zidane), bboxes=box)
    [from_bgr] = small_model(np.ascontiguousarray(rgb[..., ::-1]), bboxes=box, image_format="BGR")
    for other in (called, from_pil, from_bgr):
        assert np.array_equal(other.logits, reference.logits)
        assert np.array_equal(other.masks.data, reference.masks.data)
        assert np.array_equal(other.image, rgb)
    assert set(reference.speed) == {"preprocess", "inference", "postprocess"}
    assert all(v >= 0 for v in reference.speed.values()) and reference.speed["inference"] > 0
    assert small_model(str(zidane), bboxes=box)[0].path == str(zidane)
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        small_model(rgb, bboxes=box, image_format="HSV")
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        small_model(12, bboxes=box)


def test_device_auto_is_cpu_without_a_gpu(checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto picks it")
    assert SAM(checkpoint, image_size=256).device.type == "cpu"
