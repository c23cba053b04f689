"""`SAM`: the MobileSAM API users know from Ultralytics, encode once and decode many.

from pipeline import SAM
model = SAM("mobile_sam.pt")
results = model("zidane.jpg", bboxes=[439, 437, 524, 709])  # or model.predict(...)
result = results[0]  # a list of one Results per image, as in Ultralytics
result.masks.data  # (N, H, W) bool at the image's size; result[0], for obj in result: per object
result.save("zidane_masks.png")  # result.plot(), result.to_json(), result.speed

Images: a path, a PIL image, or an (H, W, 3) uint8 numpy array in RGB order (SAM's
convention); pass ``image_format="BGR"`` for OpenCV's arrays (cv2.imread). Ultralytics reads
numpy arrays as BGR: samstream does not guess, it takes the order it is told.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.infer.backend import TORCH_DTYPES, autocast
from pipeline.infer.encoder import EncoderBackend, ImageEmbedding, build_encoder
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.sam import MobileSAM, build_mobile_sam
from pipeline.model.transforms import scale_boxes, scale_coords
from pipeline.model.weights import resolve_weights
from pipeline.prompts import Prompts, parse_prompts
from pipeline.results import Masks, Results

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike[str] | np.ndarray | Image.Image
ImageFormat = Literal["RGB", "BGR"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device ("auto": CUDA when there is a GPU), with a clear error when CUDA is
    asked for but absent."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev


def load_image(source: ImageSource, image_format: ImageFormat = "RGB") -> np.ndarray:
    """An image path, PIL image, or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB, C-contiguous.

    image_format: the channel order of an array source ("RGB", or "BGR" for OpenCV's);
    files and PIL images carry their own and are converted to RGB.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be HxWx3 uint8 ({image_format}), got {source.dtype} "
                f"{source.shape}"
            )
        if source.shape[0] == 0 or source.shape[1] == 0:
            raise ValueError(f"image array is empty: {source.shape}")
        if image_format == "BGR":
            source = source[..., ::-1]
        return np.ascontiguousarray(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "image source must be a path, a PIL image or a numpy array, "
            f"not {type(source).__name__}"
        )
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from err


class SAM:
    """MobileSAM for images: load the checkpoint, encode an image once, decode prompts in a batch.

    weights: a path to `mobile_sam.pt` (official layout), or the bare name `mobile_sam.pt`
    to use $SAMSTREAM_WEIGHTS, the cache, or a download. device: "auto" (CUDA when there is
    a GPU, as in `samstream run`), "cpu", "cuda", "cuda:1".
    dtype: "float32" (exact), "bfloat16" or "float16" (autocast: faster, less exact), for
    the encoder and the decoder; "auto": the encoder's precision is the backend's choice
    (see pipeline.infer.encoder), the decoder's float32.
    image_size: the encoder's input side, 1024 as trained; 512 or 768 for speed.
    backend: how the image encoder runs: "torch" (this model), "onnxruntime", "openvino"
    (the model exported to ONNX once and cached; CPU only), or "auto" (the fastest one
    within tolerance on this machine, measured once and cached; torch on a GPU).
    threads: the encoder's intra-op threads on a CPU (None: $OMP_NUM_THREADS, else every
    core; torch's own pool is then left as it is).
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = "mobile_sam.pt",
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        image_size: int = 1024,
        backend: str = "torch",
        threads: int | None = None,
    ) -> None:
        precision = str(dtype).removeprefix("torch.")  # a torch dtype or its name
        if precision != "auto" and precision not in TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        self.device = resolve_device(device)
        self.dtype = TORCH_DTYPES.get(precision, torch.float32)  # auto: the decoder's float32
        model = build_mobile_sam(img_size=image_size)  # checks the size before a download
        self.weights_path = resolve_weights(weights)
        load_checkpoint(model, self.weights_path)
        # eval() also drops timm's cached attention biases, computed from the loaded weights.
        self.model: MobileSAM = model.to(self.device).eval()
        log.info("loaded %s on %s (%s)", self.weights_path, self.device, self.dtype)
        self.encoder: EncoderBackend = build_encoder(
            model=self.model,
            weights_path=self.weights_path,
            backend=backend,
            dtype=precision,
            threads=threads,
        )

    @property
    def backend_report(self) -> dict[str, Any]:
        """Which encoder backend runs, at what precision and threads, and why (for `auto`:
        the measured ms and parity error of every candidate)."""
        return self.encoder.report

    @property
    def image_size(self) -> int:
        return self.model.img_size

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encode same-sized HxWx3 uint8 RGB frames -> (BxCxhxw float embeddings, input size).

        The encoder backend does the preprocessing: on the host (PIL's resize, as the
        reference does) or, for torch on CUDA, all of it on the device (`pipeline.infer.gpu`).
        """
        if not images:
            raise ValueError("encode_batch needs at least one image")
        shape = images[0].shape
        if any(img.shape != shape for img in images):
            raise ValueError("encode_batch needs images of one size (frames of one stream)")
        return self.encoder.encode_frames(images)

    def set_image(self, source: ImageSource, image_format: ImageFormat = "RGB") -> ImageEmbedding:
        """Encode one image (see `load_image`) for any number of later `decode` calls."""
        image = load_image(source, image_format)
        embeddings, input_size = self.encode_batch([image])
        return ImageEmbedding(embeddings, (image.shape[0], image.shape[1]), input_size)

    @torch.inference_mode()
    def decode(
        self,
        image: ImageEmbedding,
        prompts: Prompts,
        *,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every prompt of one image through the mask decoder in one batched call.

        Returns (logits NxMxHxW at the original size, scores NxM, low-res logits NxMxhxw),
        float32, on the model's device; mask_inputs: Nx1xhxw low-res logits or None.
        """
        size, long_side = image.original_size, self.image_size
        boxes = points = None
        if prompts.boxes is not None:
            boxes = torch.from_numpy(scale_boxes(prompts.boxes, size, long_side)).to(self.device)
        if prompts.points is not None:
            coords = torch.from_numpy(scale_coords(prompts.points, size, long_side))
            labels = torch.from_numpy(prompts.labels)
            points = (coords.to(self.device), labels.to(self.device))
        with autocast(self.device, self.dtype):
            low_res, scores = self.model.decode(
                image.embedding,
                points=points,
                boxes=boxes,
                mask_inputs=mask_inputs,
                multimask_output=multimask_output,
            )
        low_res = low_res.float()
        logits = self.model.upscale_masks(low_res, image.input_size, image.original_size)
        return logits, scores.float(), low_res

    def predict(
        self,
        source: ImageSource,
        bboxes: Any = None,
        points: Any = None,
        labels: Any = None,
        multimask_output: bool = False,
        *,
        image_format: ImageFormat = "RGB",
    ) -> list[Results]:
        """Segment the prompted objects of one image: a list of one `Results`, as Ultralytics
        gives one per image (see `pipeline.prompts` for nesting; `load_image` for the
        sources and ``image_format``)."""
        start = perf_counter()
        image = load_image(source, image_format)
        # Validate before the (slow) encode so a bad prompt costs nothing.
        prompts = parse_prompts((image.shape[0], image.shape[1]), bboxes, points, labels)
        encoded = perf_counter()
        embedded = self.set_image(image)
        logits, scores, low_res = self.decode(embedded, prompts, multimask_output=multimask_output)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        decoded = perf_counter()
        masks = logits > self.model.mask_threshold
        results = Results(
            masks=Masks(masks.flatten(0, 1).cpu().numpy()),
            scores=scores.flatten().cpu().numpy(),
            logits=low_res.flatten(0, 1).cpu().numpy(),
            image=image,
            path=str(source) if isinstance(source, (str, os.PathLike)) else None,
        )
        done = perf_counter()
        results.speed.update(
            preprocess=(encoded - start) * 1000,
            inference=(decoded - encoded) * 1000,
            postprocess=(done - decoded) * 1000,
        )
        return [results]

    __call__ = predict  # ``model(...)`` is ``model.predict(...)``, as in Ultralytics
