"""The image encoder on every backend: torch, ONNX Runtime and OpenVINO, and `auto`.

Every backend takes the same input, made on the host by `preprocess` (the longest side
already resized with PIL, as SamPredictor does): a Bx3xSxS float32 batch, normalised with
SAM's pixel mean/std and zero-padded bottom-right, and returns Bx256x(S/16)x(S/16) float32
embeddings (`EncoderBackend.encode`). The ONNX backends run the encoder that
`pipeline.infer.export` exports on first use and caches.

`auto` (the default of `encoder.backend`) picks, per machine, the fastest backend that is
installed and whose embedding of a fixed textured image is within the tolerance of its
precision of torch fp32 (`TOLERANCES`), by timing each candidate a few times at the run's
input size with the node's thread count (``pipeline.infer.calibration``, cached). Reduced
precision (bf16 autocast, OpenVINO's bf16 inference precision) is a candidate only on CPUs
that do bf16 in hardware: emulated bf16 measured 12x slower than fp32. On a GPU, `auto` is
torch, which takes frames as decoded, preprocesses them on the device and replays the
encoder from CUDA graphs (`TorchEncoder`, pipeline.infer.gpu).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.infer.backend import ONNX_PRECISIONS, Backend, OnnxBackend, TorchBackend
from pipeline.infer.build import BackendSpec, build_backend
from pipeline.infer.calibration import Calibration, Candidate, candidate
from pipeline.infer.export import ENCODER
from pipeline.infer.gpu import CudaGraphRunner, device_preprocess, half_copy, upload
from pipeline.infer.machine import native_bf16
from pipeline.model.sam import MobileSAM
from pipeline.model.transforms import resize_longest_side

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Largest relative error (Frobenius norm of the difference / norm of torch fp32's) of the
# embedding a backend may have, by precision. Measured on random-weight checkpoints: fp32
# 1.1e-6 (ONNX Runtime) and 1.4e-6 (OpenVINO); bf16 0.8e-2 to 2.0e-2 (torch autocast and
# OpenVINO alike), in line with the 2.1e-2 of bf16 on a GPU. A backend over its tolerance
# is never chosen by `auto`.
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass(frozen=True)
class ImageEmbedding:
    """One encoded image: embedding 1xCxhxw, its original (H, W) and resized (h, w) sizes."""

    embedding: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def preprocess(resized: np.ndarray, image_size: int) -> np.ndarray:
    """Bxhxwx3 uint8 RGB (longest side resized to at most `image_size`) -> Bx3xSxS float32.

    SAM's normalisation ((x - mean) / std, in float32: the same arithmetic, so the same
    bits, as MobileSAM.preprocess), zero-padded bottom-right to S = image_size: the device
    path's own arithmetic (`pipeline.infer.gpu.device_preprocess`), here on the host.
    """
    frames = upload(resized, torch.device("cpu"))
    batch, _ = device_preprocess(frames, image_size=image_size, dtype=torch.float32, resize=False)
    return batch.numpy()


def calibration_input(image_size: int) -> np.ndarray:
    """The calibration and parity input: 1x3xSxS, a fixed 4:3 textured image, preprocessed.

    Real-valued and image-like (gradients, edges, fine texture, padding), deterministic so
    that every backend sees the same numbers; no file is needed.
    """
    h, w = (3 * image_size) // 4, image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    image = np.stack(
        [
            255 * xx / w,
            127 + 120 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
            np.where((xx // 32 + yy // 32) % 2 == 0, 200.0, 40.0),
        ],
        axis=-1,
    )
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return preprocess(image[None], image_size)


class EncoderBackend(Backend):
    """One way to run the image encoder: Bx3xSxS float32 (see `preprocess`) -> BxCxhxw float32
    (S: `image_size`)."""

    def _check(self, batch: np.ndarray) -> np.ndarray:
        s = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s) or batch.dtype != np.float32:
            raise ValueError(
                f"the encoder takes Bx3x{s}x{s} float32 (pipeline.infer.encoder."
                f"preprocess), got {batch.dtype} {batch.shape}"
            )
        return np.ascontiguousarray(batch)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Bx3xSxS float32, normalised and padded -> Bx256x(S/16)x(S/16) float32."""
        raise NotImplementedError

    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        """Bxhxwx3 uint8 RGB, longest side resized -> BxCx(S/16)x(S/16) float32 tensor."""
        return torch.from_numpy(self.encode(preprocess(resized, self.image_size)))

    def encode_frames(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Same-sized HxWx3 uint8 RGB frames -> (BxCx(S/16)x(S/16) float32 embeddings, the
        (h, w) of the resized image inside the input). Here the resize is PIL's, on the host."""
        resized = np.stack([resize_longest_side(frame, self.image_size) for frame in frames])
        return self.encode_images(resized), (resized.shape[1], resized.shape[2])


class TorchEncoder(TorchBackend, EncoderBackend):
    """The PyTorch model, fp32 or in half precision, on its device.

    On a CPU, half precision is autocast over the fp32 weights and frames are resized on the
    host (PIL measured faster there than torch's resize: 22 vs 31 ms for 1080p -> 1024 on
    one core). On CUDA, half precision runs a copy of the image encoder with half weights
    (still under autocast, which keeps norms and softmax in fp32), the whole preprocessing
    runs on the device (`pipeline.infer.gpu.device_preprocess`), and with `cuda_graphs` the
    encoder is replayed from one CUDA graph per batch size and image size
    (`pipeline.infer.gpu.CudaGraphRunner`; eager where a capture fails, with the reason logged).
    """

    def __init__(
        self, *, model: MobileSAM, precision: str = "float32", cuda_graphs: bool = True
    ) -> None:
        super().__init__(model=model, precision=precision)
        on_cuda = model.device.type == "cuda"
        half_weights = on_cuda and self.dtype != torch.float32
        self.image_encoder = (
            half_copy(model.image_encoder, self.dtype) if half_weights else model.image_encoder
        )
        # What the encoder is fed: its weights' dtype (on a CPU, fp32 under autocast).
        self.input_dtype = self.dtype if half_weights else torch.float32
        # Where frames are resized: on CUDA on the device; on a CPU with PIL (faster there).
        self.resize_on_device = on_cuda
        # Bx3xSxS `input_dtype` on the device -> embeddings in `precision` (not yet float).
        self.run: Callable[[torch.Tensor], torch.Tensor] = self._forward
        if on_cuda and cuda_graphs:
            self.run = CudaGraphRunner(self._forward)

    def describe(self) -> dict[str, Any]:
        graphs = isinstance(self.run, CudaGraphRunner)
        return {**super().describe(), "cuda_graphs": graphs}

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.image_encoder(x)

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(self._check(batch)).to(self.model.device, self.input_dtype)
        return self.run(x).float().cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, resized: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (4x fewer bytes than float) and is normalised there.
        frames = upload(resized, self.model.device)
        x, _ = device_preprocess(
            frames, image_size=self.image_size, dtype=self.input_dtype, resize=False
        )
        return self.run(x).float()

    @torch.inference_mode()
    def encode_frames(self, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        if not self.resize_on_device:
            return super().encode_frames(frames)
        x, input_size = device_preprocess(
            upload(frames, self.model.device), image_size=self.image_size, dtype=self.input_dtype
        )
        return self.run(x).float(), input_size


class OnnxEncoder(OnnxBackend, EncoderBackend):
    """The exported encoder (``images`` -> ``embeddings``) in ONNX Runtime or OpenVINO."""

    def encode(self, batch: np.ndarray) -> np.ndarray:
        return self.onnx({"images": self._check(batch)})[0]


def candidates(dtype: str) -> list[Candidate]:
    """What the encoder's `auto` considers for an `encoder.dtype`, with why any is left out."""
    native = native_bf16()
    precisions = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    out = []
    for precision in precisions:
        for backend in ("torch", *ONNX_PRECISIONS):
            if backend != "torch" and precision not in ONNX_PRECISIONS[backend]:
                continue  # see ONNX_PRECISIONS
            cand = candidate(backend, precision, TOLERANCES[precision])
            if not cand.skipped and precision == "bfloat16" and dtype == "auto" and not native:
                cand.skipped = "no native bf16 on this CPU (emulated bf16 is ~12x slower)"
            out.append(cand)
    return out


def build_encoder(
    *,
    model: MobileSAM,
    weights_path: str | os.PathLike[str],
    backend: str = "torch",
    dtype: str = "float32",
    threads: int | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> EncoderBackend:
    """The encoder backend for `model` (on its device), with `report` saying why.

    backend: auto | torch | onnxruntime | openvino. dtype: auto | float32 | bfloat16 |
    float16 (auto: what `auto` measures best within tolerance; for a named backend, or on a
    GPU, float32). threads: intra-op threads (None: the node's budget, see
    `pipeline.infer.backend.backend_threads`). cache: where exports and calibrations live
    (default: the weights cache dir).
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"encoder dtype {dtype!r} is not one of {' | '.join(PRECISIONS)}")

    measured = Calibration(
        what="encoder",
        name=ENCODER,
        image_size=model.img_size,
        settings={"dtype": dtype, "tolerances": TOLERANCES},
        precisions=tuple(TOLERANCES),
        candidates=functools.partial(candidates, dtype),
        inputs={"image": functools.partial(calibration_input, model.img_size)},
        run=lambda encoder, x: encoder.encode(x),
        reference=functools.partial(TorchEncoder, model=model, precision="float32"),
        reference_label="torch/float32",
        hint=f" for encoder.dtype {dtype}; use encoder.dtype auto or float32",
    )
    spec = BackendSpec[EncoderBackend](
        section="encoder",
        torch=functools.partial(TorchEncoder, model=model),
        onnx=OnnxEncoder,
        calibration=measured,
        dtype_setting="encoder.dtype",
        model=model,
        weights_path=weights_path,
        threads=threads,
        cache=cache,
        requested={"backend": backend, "dtype": dtype},
    )
    return build_backend(spec, backend, "float32" if dtype == "auto" else dtype)
