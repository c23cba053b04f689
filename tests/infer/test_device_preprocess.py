"""pipeline.infer.gpu on the CPU: the device-side preprocessing and the CUDA-graph runner's
fallback, the same code the CUDA path runs (tests/infer/test_gpu.py checks it on a GPU).

Resize tolerance: one grey level. The device resize is torch's antialiased bilinear, the
filter of PIL's BILINEAR; PIL rounds to uint8 between its horizontal and vertical passes
and torch does not, so some pixels land one level apart (measured: max 1, on 7-18% of the
values, for 548x342 and 1920x1080 sources at 256, 512 and 1024). A level is 1/57 in SAM's
normalised units. The embedding is bounded too, against how much it moves for another image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bench import compiled_encoder_rows, format_gpu_table, gpu_encoder_table
from pipeline.infer.backend import relative_error
from pipeline.infer.encoder import TOLERANCES, preprocess
from pipeline.infer.gpu import (
    CudaGraphRunner,
    device_preprocess,
    half_copy,
    normalise_and_pad,
    upload,
)
from pipeline.infer.machine import native_bf16
from pipeline.model.sam import PIXEL_STD
from pipeline.model.transforms import resize_longest_side
from pipeline.predictor import SAM

SIZE = 256
LEVEL = 1 / min(PIXEL_STD)  # one grey level, normalised
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SAM:
    return SAM(checkpoint, device="cpu", image_size=SIZE, backend="torch")


def _textured(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx % 97 * 2.6, yy % 61 * 4, 127 + 120 * np.sin(xx / 7 + yy / 11)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("source", ["real", "1080p"])
def test_device_preprocess_matches_the_host_path_within_a_level(
    real_image: np.ndarray, size: int, source: str
) -> None:
    image = real_image if source == "real" else _textured(1080, 1920)
    resized = resize_longest_side(image, size)
    host = preprocess(resized[None], size)
    out, input_size = device_preprocess(upload([image], CPU), image_size=size, dtype=torch.float32)
    assert input_size == resized.shape[:2]
    assert out.dtype == torch.float32 and out.shape == (1, 3, size, size)
    diff = np.abs(out.numpy() - host)
    assert diff.max() <= LEVEL * 1.0001, f"off by {diff.max() / LEVEL:.2f} levels"
    assert (diff > 0).mean() < 0.25  # one level on some pixels, not a shifted image
    h, w = input_size
    assert not out[..., h:, :].any() and not out[..., :, w:].any()  # zero padding


def test_without_resize_it_is_the_host_arithmetic_bit_for_bit(real_image: np.ndarray) -> None:
    resized = resize_longest_side(real_image, SIZE)
    out, input_size = device_preprocess(
        upload(resized[None], CPU), image_size=SIZE, dtype=torch.float32, resize=False
    )
    assert input_size == resized.shape[:2]
    np.testing.assert_array_equal(out.numpy(), preprocess(resized[None], SIZE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_cast_to_the_encoder_dtype_is_the_last_step(
    real_image: np.ndarray, dtype: torch.dtype
) -> None:
    resized = resize_longest_side(real_image, SIZE)
    exact = torch.from_numpy(preprocess(resized[None], SIZE))
    half = normalise_and_pad(upload(resized[None], CPU).permute(0, 3, 1, 2), SIZE, dtype)
    assert half.dtype == dtype
    torch.testing.assert_close(half, exact.to(dtype), rtol=0, atol=0)


def test_upload_rejects_what_the_encoder_cannot_take() -> None:
    frame = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(ValueError, match="at least one frame"):
        upload([], CPU)
    with pytest.raises(ValueError, match="same-sized HxWx3"):
        upload([frame, np.zeros((4, 5, 3), np.uint8)], CPU)
    with pytest.raises(ValueError, match="uint8"):
        upload([frame.astype(np.float32)], CPU)
    with pytest.raises(ValueError, match="exceed the input size 4"):
        normalise_and_pad(torch.zeros(1, 3, 4, 6), 4, torch.float32)
    read_only = np.stack([frame, frame + 1])
    read_only.flags.writeable = False
    np.testing.assert_array_equal(upload(read_only, CPU).numpy(), read_only)


def test_the_encoder_embedding_barely_moves_with_the_device_resize(
    sam: SAM, real_image: np.ndarray
) -> None:
    encoder = sam.encoder
    on_host, host_size = encoder.encode_frames([real_image])
    encoder.resize_on_device = True  # the CUDA path, here on the CPU
    try:
        on_device, device_size = encoder.encode_frames([real_image])
    finally:
        encoder.resize_on_device = False
    other, _ = encoder.encode_frames([np.ascontiguousarray(real_image[::-1])])
    assert host_size == device_size == resize_longest_side(real_image, SIZE).shape[:2]
    err = relative_error(on_device.numpy(), on_host.numpy())
    # Random weights make the encoder nearly blind to its input (an upside-down image moves
    # the embedding by ~7e-6): bound the drift against that, and absolutely (measured
    # 8.3e-7, 0.12 of the flip's).
    moved = relative_error(other.numpy(), on_host.numpy())
    assert err < 1e-5 and err < 0.25 * moved, f"drift {err:.2g}, another image {moved:.2g}"


def test_encode_frames_on_the_cpu_is_the_host_path(sam: SAM, real_image: np.ndarray) -> None:
    resized = np.stack([resize_longest_side(real_image, SIZE)] * 2)
    embeddings, input_size = sam.encoder.encode_frames([real_image, real_image])
    assert input_size == resized.shape[1:3]
    torch.testing.assert_close(embeddings, sam.encoder.encode_images(resized), rtol=0, atol=0)


def test_half_copy_has_half_weights_and_stays_within_the_bf16_tolerance(sam: SAM) -> None:
    # bf16 (fp16 kernels are missing for some ops on the CPU): the same copy and autocast
    # as the CUDA path's half precision.
    module = half_copy(sam.model.image_encoder, torch.bfloat16)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert not module.training
    assert {p.dtype for p in sam.model.image_encoder.parameters()} == {torch.float32}
    x = torch.from_numpy(preprocess(resize_longest_side(_textured(240, 320), SIZE)[None], SIZE))
    with torch.inference_mode():
        exact = sam.model.image_encoder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            half = module(x.bfloat16())
    assert torch.isfinite(half).all()
    err = relative_error(half.float().numpy(), exact.numpy())
    assert err < TOLERANCES["bfloat16"], f"bf16 copy off by {err:.3g}"


def test_the_graph_runner_falls_back_to_eager_once_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x * 2

    runner = CudaGraphRunner(fn)
    x = torch.arange(6.0).view(2, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.infer.gpu"):
        torch.testing.assert_close(runner(x), x * 2)
        torch.testing.assert_close(runner(x + 1), (x + 1) * 2)
    assert calls == [(2, 3), (2, 3)]  # eager each time, no retried capture
    assert not runner.graphs
    (reason,) = runner.failures.values()
    assert "need a CUDA tensor" in reason
    warnings = [r for r in caplog.records if "running it eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "need a CUDA tensor" in warnings[0].getMessage()


def test_the_torch_encoder_on_the_cpu_runs_eagerly(sam: SAM) -> None:
    assert sam.encoder.report["cuda_graphs"] is False
    assert sam.encoder.image_encoder is sam.model.image_encoder  # no copy on the CPU


def test_the_gpu_table_runs_on_the_cpu_and_says_what_needs_cuda(
    checkpoint: Path, real_image: np.ndarray
) -> None:
    results = gpu_encoder_table(
        str(checkpoint),
        real_image,
        device="cpu",
        image_size=SIZE,
        batches=(1, 2),
        tracks=(1, 3),
        repeats=1,
    )
    assert results["device"] == "cpu"
    for batch in (1, 2):
        assert results[f"encoder_ms_fp32_eager_batch{batch}"] > 0
    assert results["encode_frames_ms_fp32_eager_batch1"] > 0
    assert results["encoder_finite_fp32_eager"] == "True"
    assert results["encoder_rel_error_fp32_eager"] == 0.0  # the reference
    # Half precision on a CPU without native support is emulated: no figure, a reason.
    half = ["fp16_eager"] + ([] if native_bf16() else ["bf16_eager"])
    for variant in half:
        assert results[f"encoder_ms_{variant}_batch1"] == "n/a: emulated on this CPU"
    if native_bf16():
        assert 0 < results["encoder_rel_error_bf16_eager"] < TOLERANCES["bfloat16"]
        assert results["encoder_finite_bf16_eager"] == "True"
    for batch in (1, 2):
        assert results[f"encoder_ms_fp16_graph_batch{batch}"] == "n/a: no CUDA"
        for official in ("official_fp32_eager", "official_fp16_graph"):
            assert "1024 only" in results[f"encoder_ms_{official}_batch{batch}"]
    for tracks in (1, 3):
        assert results[f"mask_decoder_ms_fp32_{tracks}_tracks"] > 0
        assert results[f"mask_decoder_ms_fp16_{tracks}_tracks"] == "n/a: emulated on this CPU"
    table = format_gpu_table(results).splitlines()
    assert table[0].split() == ["encoder", "ms", "(median)", "/", "batch", "1", "2"]
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in table[1:7]}
    assert len(table) == 1 + 6 + len(results) - 6 * 2  # the matrix, then the other rows
    assert rows["fp16_graph"] == "n/a: no CUDA"
    assert rows["official_fp32_eager"] == "n/a: the official encoder runs at 1024 only"
    assert [float(v) for v in rows["fp32_eager"].split()] == [
        round(results[f"encoder_ms_fp32_eager_batch{b}"], 2) for b in (1, 2)
    ]


def test_the_compiled_encoder_row_needs_cuda(checkpoint: Path, real_image: np.ndarray) -> None:
    rows = compiled_encoder_rows(str(checkpoint), real_image, device="cpu", image_size=SIZE)
    assert rows == {"encoder_ms_fp16_compiled_batch1": "n/a: no CUDA"}
