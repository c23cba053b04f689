"""The tracker's mask decoder: MobileSAM's prompt encoder + mask decoder on every backend
(torch, ONNX Runtime, OpenVINO, and `auto`: ``tracker.backend``), and `SamMaskDecoder`, which
runs one frame's prompts through a backend and upscales the masks only in the windows where
they can be (``pipeline.infer.upscale``).

The tracker's cost grows with its objects: every object is one prompt through MobileSAM's
prompt encoder + mask decoder, ~50 ms each at 1024 px in torch on one CPU core. Every
backend runs the same function, one frame's prompts in one call: one image embedding
1xCxhxw and N prompts (boxes and/or points in the resized input frame, an optional
low-res mask prompt each) -> low-res logits Nx1x(4h)x(4w) and scores Nx1, float32
(`MaskDecoderBackend.decode`). The upscaling to the frame stays in torch (`SamMaskDecoder`).

- ``torch``: ``pipeline.infer.decoder_graph.DecoderOnnxModel`` run in PyTorch, MobileSAM.decode's
  function with its arithmetic reordered so that work shared by the prompts is done once
  (exact algebra; ~1e-6 relative from MobileSAM.decode). ``TorchMaskDecoder(exact=True)``
  is MobileSAM.decode itself, bit for bit ``SAM.decode``: the parity reference, and what
  ``SamMaskDecoder`` runs when given no backend.
- ``onnxruntime``, ``openvino``: that model exported to ONNX once per checkpoint and size
  (``pipeline.infer.export.cached_onnx``, dynamic prompt and point counts), fp32 (OpenVINO's
  precision hint set to f32: it would pick bf16 by itself on CPUs with native bf16).

`auto` is the encoder's calibration (``pipeline.infer.calibration``, cached the same way)
given the mask decoder's candidates and inputs: it times every installed candidate on this
machine at the run's size and thread count on 1 and 8 box + mask prompts, parity-checks it
against MobileSAM.decode in fp32 (low-res logits within `TOLERANCE` relative), and keeps
the fastest (the sum of both timings). Reduced precision is not a candidate: the tracker
feeds each mask back as the next frame's mask prompt, so errors compound over frames
(OpenVINO bf16 measured 1.3e-2 relative error on the logits). On a GPU, `auto` is torch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.infer.backend import ONNX_BACKENDS, Backend, OnnxBackend, TorchBackend
from pipeline.infer.build import BackendSpec, build_backend
from pipeline.infer.calibration import Calibration, candidate
from pipeline.infer.decoder_graph import DecoderOnnxModel, onnx_prompts
from pipeline.infer.encoder import ImageEmbedding
from pipeline.infer.export import DECODER
from pipeline.infer.upscale import EMPTY_BOX, Upscaler, matches_full_frame
from pipeline.model.sam import SamDecoder
from pipeline.model.transforms import scale_boxes, scale_coords
from pipeline.track.exclusive import ContestedPixels, DecodedMasks
from pipeline.wire.masks import RegionMask, WindowBox

log = logging.getLogger(__name__)

# Largest relative error (Frobenius norm) of the low-res logits vs MobileSAM.decode in fp32.
# Measured on random weights at 256 and 1024 px: torch (reordered) 5e-7, ONNX Runtime and
# OpenVINO 6e-7 to 9e-7.
TOLERANCE = 1e-4
CALIBRATION_COUNTS = (1, 8)  # prompts per timed call: one object, and a crowded scene


@dataclass(frozen=True)
class PromptBatch:
    """One decoder call: N prompts of one kind on one image (see `MaskDecoderBackend.decode`)."""

    embedding: torch.Tensor
    boxes: np.ndarray | None
    points: tuple[np.ndarray, np.ndarray] | None
    mask_input: torch.Tensor | None

    def sam_inputs(self) -> dict[str, Any]:
        """`SamDecoder.decode`'s prompt arguments, on the embedding's device."""
        device = self.embedding.device
        points = None
        if self.points is not None:
            coords, labels = self.points
            points = (torch.from_numpy(coords).to(device), torch.from_numpy(labels).to(device))
        boxes = None if self.boxes is None else torch.from_numpy(self.boxes).to(device)
        return {"points": points, "boxes": boxes, "mask_inputs": self.mask_input}

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        """The decoder graph's inputs (``pipeline.infer.export.DECODER_INPUTS``), on the
        embedding's device: without a mask prompt, 1x1x(4h)x(4w) zeros and has_mask_input 0."""
        device = self.embedding.device
        coords, labels = onnx_prompts(points=self.points, boxes=self.boxes)
        mask_input, has = self.mask_input, torch.ones(1, device=device)
        if mask_input is None:
            h, w = self.embedding.shape[-2:]
            mask_input = torch.zeros(1, 1, 4 * h, 4 * w, device=device)
            has = torch.zeros(1, device=device)
        return {
            "image_embeddings": self.embedding,
            "point_coords": torch.from_numpy(coords).to(device),
            "point_labels": torch.from_numpy(labels).to(device),
            "mask_input": mask_input,
            "has_mask_input": has,
        }


class MaskDecoderBackend(Backend):
    """One way to run the prompt encoder + mask decoder on one frame's prompts (`run`)."""

    def decode(
        self,
        embedding: torch.Tensor,
        *,
        boxes: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call for N prompts of one kind.

        embedding: 1xCxhxw float32; boxes Nx4 (x1, y1, x2, y2) and/or points (NxKx2 coords,
        NxK labels 1/0), in the resized input frame's pixels; mask_input Nx1x(4h)x(4w)
        low-res logits or None. Returns low-res logits Nx1x(4h)x(4w) and scores Nx1,
        float32, on the embedding's device.
        """
        return self.run(PromptBatch(embedding, boxes, points, mask_input))

    def run(self, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TorchMaskDecoder(TorchBackend, MaskDecoderBackend):
    """The mask decoder in PyTorch on the model's device.

    exact: False runs ``DecoderOnnxModel`` (the shared work done once: ~2x less per prompt
    at 1024 px, ~1e-6 relative from MobileSAM.decode); True runs MobileSAM.decode, bit for
    bit what ``SAM.decode`` gives. precision: float32, or bfloat16 / float16 under autocast
    (the tracker's SAM dtype).
    """

    def __init__(
        self, *, model: SamDecoder, precision: str = "float32", exact: bool = False
    ) -> None:
        super().__init__(model=model, precision=precision)
        self.exact = exact
        self.network = DecoderOnnxModel(model=model, upscale_with_matmuls=False).eval()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "graph": "MobileSAM.decode" if self.exact else "reordered"}

    @torch.inference_mode()
    def run(self, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            if self.exact:
                low, scores = self.model.decode(prompts.embedding, **prompts.sam_inputs())
            else:
                low, scores = self.network(**prompts.graph_inputs())
        return low.float(), scores.float()


class OnnxMaskDecoder(OnnxBackend, MaskDecoderBackend):
    """The exported mask decoder in ONNX Runtime or OpenVINO (on the CPU)."""

    def run(self, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if prompts.embedding.device.type != "cpu":
            raise ValueError(f"tracker.backend {self.name} runs on the CPU only")
        inputs = prompts.graph_inputs()
        feeds = {k: np.ascontiguousarray(v.detach().float().numpy()) for k, v in inputs.items()}
        low, scores = self.onnx(feeds)
        return torch.from_numpy(low), torch.from_numpy(scores)


def calibration_prompts(
    model: SamDecoder, count: int, *, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The calibration and parity inputs: (a 1xCxhxw embedding, `count` boxes Nx4 of
    100-300 px (at 1024) over a 4:3 input frame, Nx1x(4h)x(4w) mask-prompt logits).

    Deterministic, so that every backend sees the same numbers; real-valued like an
    encoder's output and a previous frame's logits (blobs with texture), no file needed.
    """
    rng = np.random.default_rng(seed)
    s, grid = model.img_size, model.embedding_size
    low = 4 * grid
    embedding = rng.standard_normal((1, model.prompt_encoder.embed_dim, grid, grid))
    scale = s / 1024
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(100, 300, 2) * scale
        x, y = rng.uniform(0, s - w), rng.uniform(0, 0.75 * s - h)
        boxes.append([x, y, x + w, y + h])
    box_arr = np.asarray(boxes, np.float32)
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float32) + 0.5
    masks = []
    for x1, y1, x2, y2 in box_arr * (low / s):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        blob = 12 * (1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
        masks.append(np.maximum(blob + rng.normal(0, 1.0, blob.shape), -20))
    device = model.device
    return (
        torch.from_numpy(embedding.astype(np.float32)).to(device),
        box_arr,
        torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device),
    )


def build_mask_decoder(
    *,
    model: SamDecoder,
    weights_path: str | os.PathLike[str],
    backend: str = "torch",
    threads: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    precision: str = "float32",
) -> MaskDecoderBackend:
    """The tracker's mask decoder backend for `model` (on its device), `report` saying why.

    backend: auto | torch | onnxruntime | openvino. threads: intra-op threads (None: the
    node's budget, see `pipeline.infer.backend.backend_threads`; torch's pool is then left
    as it is). cache: where exports and calibrations live (default: the weights cache dir).
    precision: torch's autocast dtype (float32 unless the tracker's SAM is in another).
    """

    measured = Calibration(
        what="tracker mask decoder",
        name=DECODER,
        image_size=model.img_size,
        settings={"counts": list(CALIBRATION_COUNTS), "tolerance": TOLERANCE},
        precisions=("float32",),  # see the module docs
        candidates=lambda: [candidate(b, "float32", TOLERANCE) for b in ("torch", *ONNX_BACKENDS)],
        inputs={
            str(n): functools.partial(calibration_prompts, model, n, seed=n)
            for n in CALIBRATION_COUNTS
        },
        run=_low_res,
        # MobileSAM.decode itself: the torch candidate is the reordered graph.
        reference=functools.partial(TorchMaskDecoder, model=model, exact=True),
        unit="prompts",
    )
    spec = BackendSpec[MaskDecoderBackend](
        section="tracker",
        torch=functools.partial(TorchMaskDecoder, model=model),
        onnx=OnnxMaskDecoder,
        calibration=measured,
        model=model,
        weights_path=weights_path,
        threads=threads,
        cache=cache,
        requested={"backend": backend},
    )
    return build_backend(spec, backend, precision)


def _low_res(decoder: MaskDecoderBackend, inputs: Any) -> np.ndarray:
    """One calibration call: the box + mask prompts' low-res logits, compared for parity."""
    embedding, boxes, masks = inputs
    return decoder.decode(embedding, boxes=boxes, mask_input=masks)[0].cpu().numpy()


class SamMaskDecoder:
    """The tracker's batched decoder: MobileSAM's prompt encoder + mask decoder on one frame.

    Rows that share a prompt kind go through the decoder together; in steady state every
    track is a box (+ previous mask) prompt, so a frame is one batched call.

    Each row's mask comes back as a RegionMask: its logits are upscaled only in the window
    where they can be above the threshold (``pipeline.infer.upscale``), the same float32 values as
    ``SAM.decode``'s full-frame upscaling, so the masks are pixel for pixel the same. Whether
    this machine's resize kernel gives windows exactly the full-frame values is checked once
    per frame geometry; where it does not (another PyTorch build, a very small frame), or
    with ``windowed=False``, the whole frame is upscaled and the windows cut from it.

    exclusive: also report every row's full-resolution logits in its window (across all of
    the frame's decoder calls), so the tracker can give each pixel two or more rows claim to
    one track (``track.exclusive.exclusive_masks``); False leaves the masks overlapping. The rows'
    own masks come back either way: the tracker measures on them, and only it knows which
    tracks are lost or coasting by then.

    model: the decoder-only model (the tracker's: ``pipeline.model.checkpoint.load_sam_decoder``,
    no image encoder) or a whole MobileSAM (its decode path); embeddings go to its device.
    backend: what runs the prompt encoder + mask decoder (`build_mask_decoder`,
    ``tracker.backend``); None: SamDecoder.decode in torch at `precision` (a SAM's dtype:
    float32, bfloat16, float16), bit for bit what ``SAM.decode`` gives.
    """

    def __init__(
        self,
        model: SamDecoder,
        *,
        precision: str = "float32",
        exclusive: bool = True,
        windowed: bool = True,
        backend: MaskDecoderBackend | None = None,
    ) -> None:
        self.model = model
        self.exclusive = exclusive
        self.windowed = windowed
        if backend is None:
            backend = TorchMaskDecoder(model=model, precision=precision, exact=True)
        self.backend = backend
        # Per (original size, input size): the window upscaler, or None for the full frame.
        self._upscalers: dict[tuple[tuple[int, int], tuple[int, int]], Upscaler | None] = {}

    @torch.inference_mode()
    def __call__(
        self,
        image: ImageEmbedding | None,
        boxes: np.ndarray,
        mask_logits: Sequence[np.ndarray | None],
        points: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ) -> DecodedMasks:
        """Decode N prompts on the frame's embedding (``track.exclusive.MaskDecoderFn``)."""
        if image is None:
            raise TypeError("SamMaskDecoder needs the frame's ImageEmbedding, got None")
        n = len(boxes)
        size = (int(image.original_size[0]), int(image.original_size[1]))
        if n == 0:
            return DecodedMasks(
                masks=(),
                scores=np.zeros(0, dtype=np.float32),
                low_res_logits=np.zeros((0, 1, 1), dtype=np.float32),
                contested=ContestedPixels(windows=()) if self.exclusive else None,
            )
        scores = np.zeros(n, dtype=np.float32)
        low_res: torch.Tensor | None = None  # (N, g, g) on the device

        def has_points(i: int) -> bool:
            return points is not None and points[i] is not None

        plain = [i for i in range(n) if not has_points(i) and mask_logits[i] is None]
        with_mask = [i for i in range(n) if not has_points(i) and mask_logits[i] is not None]
        # A points prompt (a track's first frame only) has its own point count: decoded alone.
        batches = [plain, with_mask, *([i] for i in range(n) if has_points(i))]
        for rows in filter(None, batches):
            batch_low, batch_scores = self._decode(image, boxes, mask_logits, points, rows)
            if low_res is None:
                low_res = batch_low.new_empty((n, *batch_low.shape[-2:]))
            low_res[rows] = batch_low[:, 0]
            scores[rows] = batch_scores[:, 0].cpu().numpy()
        if low_res is None:  # cannot happen: every row is in one batch
            raise RuntimeError("mask decoder invariant broken: a row was not decoded")
        low_host = low_res.cpu().numpy()
        windows, logits = self._upscale(low_res, low_host, size, image.input_size)
        masks = tuple(
            RegionMask(size, box, window > self.model.mask_threshold)
            for box, window in zip(windows, logits, strict=True)
        )
        return DecodedMasks(
            masks=masks,
            scores=scores,
            low_res_logits=low_host,
            contested=ContestedPixels(windows=logits) if self.exclusive else None,
        )

    def _upscale(
        self,
        low_res: torch.Tensor,
        low_host: np.ndarray,
        size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> tuple[list[WindowBox], list[np.ndarray]]:
        """Each row's window and its float32 logits there. low_res: (N, g, g) on the device,
        low_host: the same on the host."""
        model = self.model
        threshold = model.mask_threshold
        upscaler = self.upscaler_for(low_res.shape[-1], size, input_size)
        if upscaler is not None:
            windows = upscaler.windows(low_host, threshold)
            parts = [upscaler.window_logits(low_res[i], box) for i, box in enumerate(windows)]
        else:
            full = model.upscale_masks(low_res[:, None], input_size, size)[:, 0]
            positive = full > threshold
            rows_any = positive.any(dim=2).cpu().numpy()
            cols_any = positive.any(dim=1).cpu().numpy()
            windows = [_hit_box(r, c) for r, c in zip(rows_any, cols_any, strict=True)]
            parts = [full[i, y1:y2, x1:x2] for i, (x1, y1, x2, y2) in enumerate(windows)]
        # One copy off the device for all windows, not one per row.
        flat = torch.cat([part.reshape(-1) for part in parts]).float().cpu().numpy()
        logits, start = [], 0
        for x1, y1, x2, y2 in windows:
            stop = start + (x2 - x1) * (y2 - y1)
            logits.append(flat[start:stop].reshape(y2 - y1, x2 - x1))
            start = stop
        return windows, logits

    def upscaler_for(
        self, low_size: int, size: tuple[int, int], input_size: tuple[int, int]
    ) -> Upscaler | None:
        """The window upscaler of this geometry, or None where windows would not give the
        full-frame values here (checked once per geometry, on random logits)."""
        if not self.windowed:
            return None
        key = (size, (int(input_size[0]), int(input_size[1])))
        if key in self._upscalers:
            return self._upscalers[key]
        model = self.model
        upscaler: Upscaler | None = None
        try:
            upscaler = Upscaler(
                low_size=low_size, padded_size=model.img_size, input_size=key[1], original_size=size
            )
        except ValueError as err:
            log.info("mask upscaling over the whole frame: %s", err)
        else:

            def full_frame(low: torch.Tensor) -> torch.Tensor:
                return model.upscale_masks(low[None, None], key[1], size)[0, 0]

            if not matches_full_frame(upscaler, full_frame, model.device, probe_windows(size)):
                log.warning(
                    "mask upscaling over the whole frame: this PyTorch's resize kernel gives "
                    "windows of a %dx%d frame other values than the whole frame",
                    *size[::-1],
                )
                upscaler = None
        self._upscalers[key] = upscaler
        return upscaler

    def _decode(
        self,
        image: ImageEmbedding,
        boxes: np.ndarray,
        mask_logits: Sequence[np.ndarray | None],
        points: Sequence[tuple[np.ndarray, np.ndarray] | None] | None,
        rows: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder call for rows that share a prompt kind, ``SAM.decode`` up to its
        low-res logits: the prompts mapped to the input frame, then the prompt encoder and
        mask decoder in the backend (the full-frame upscaling is ours to do). Low-res logits
        (B, 1, g, g) and scores (B, 1), float32 on the device."""
        size, long_side = image.original_size, self.model.img_size
        box_rows = boxes[rows].astype(np.float32)
        scaled_boxes = None
        if not np.isnan(box_rows).any():
            scaled_boxes = scale_boxes(box_rows, size, long_side)
        scaled_points = None
        if points is not None and points[rows[0]] is not None:
            coords, labels = points[rows[0]]
            scaled = scale_coords(np.asarray(coords, dtype=np.float32)[None], size, long_side)
            scaled_points = (scaled, np.asarray(labels, dtype=np.int32)[None])
        mask_inputs = None
        if mask_logits[rows[0]] is not None:
            stacked = np.stack([mask_logits[i] for i in rows]).astype(np.float32)
            mask_inputs = torch.from_numpy(stacked).reshape(len(rows), 1, *stacked.shape[-2:])
            mask_inputs = mask_inputs.to(self.model.device)
        low_res, scores = self.backend.decode(
            image.embedding, boxes=scaled_boxes, points=scaled_points, mask_input=mask_inputs
        )
        return low_res.to(self.model.device), scores.to(self.model.device)


def probe_windows(size: tuple[int, int]) -> list[WindowBox]:
    """Windows of an (H, W) frame that the one-off upscaling check compares: the frame, its
    corners and edges at 1-3 pixels, thin strips, and windows of many sizes and places."""
    height, width = size
    boxes: list[WindowBox] = [(0, 0, width, height)]
    for k in (1, 2, 3):
        kx, ky = min(k, width), min(k, height)
        boxes += [
            (0, 0, kx, ky),
            (width - kx, 0, width, ky),
            (0, height - ky, kx, height),
            (width - kx, height - ky, width, height),
        ]
    boxes += [(0, height // 2, width, height // 2 + 1), (width // 2, 0, width // 2 + 1, height)]
    rng = np.random.default_rng(0)
    for _ in range(24):
        x1, y1 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x2, y2 = int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1))
        boxes.append((x1, y1, x2, y2))
    return boxes


def _hit_box(rows: np.ndarray, cols: np.ndarray) -> WindowBox:
    """The box of a mask from which of its rows and columns hold a pixel."""
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    if ys.size == 0:
        return EMPTY_BOX
    return (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
