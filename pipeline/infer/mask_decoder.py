"""The tracker's batched mask decoder: MobileSAM's prompt encoder + mask decoder on one frame,
masks upscaled only in the windows where they can be (``pipeline.infer.upscale``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.infer.decoder_backends import DecoderBackend, TorchDecoder
from pipeline.infer.upscale import EMPTY_BOX, Upscaler, matches_full_frame
from pipeline.model.sam import SamDecoder
from pipeline.model.transforms import scale_boxes, scale_coords
from pipeline.predictor import SAM, ImageEmbedding
from pipeline.track.exclusive import ContestedPixels, DecodedMasks
from pipeline.track.prompts import Prompts
from pipeline.wire.masks import RegionMask, WindowBox

log = logging.getLogger(__name__)


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
    one track (``tracking.exclusive_masks``); False leaves the masks overlapping. The rows'
    own masks come back either way: the tracker measures on them, and only it knows which
    tracks are lost or coasting by then.

    sam: the decoder-only model (the tracker's: ``pipeline.model.checkpoint.load_sam_decoder``,
    no image encoder) or a whole `SAM` (its model's decode path, at its dtype); embeddings
    go to its device. backend: what runs the prompt encoder + mask decoder
    (``pipeline.infer.decoder_backends``, ``tracker.backend``); None: SamDecoder.decode in torch
    (at the SAM's dtype; float32 for a SamDecoder), bit for bit what ``SAM.decode`` gives.
    """

    def __init__(
        self,
        sam: SamDecoder | SAM,
        *,
        exclusive: bool = True,
        windowed: bool = True,
        backend: DecoderBackend | None = None,
    ) -> None:
        self.model: SamDecoder = sam.model if isinstance(sam, SAM) else sam
        self.exclusive = exclusive
        self.windowed = windowed
        if backend is None:
            dtype = sam.dtype if isinstance(sam, SAM) else torch.float32
            precision = str(dtype).removeprefix("torch.")
            backend = TorchDecoder(model=self.model, precision=precision, exact=True)
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
        """Decode N prompts on the frame's embedding (``tracking.MaskDecoderFn``)."""
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
        """One decoder call for rows that share a prompt kind: low-res logits (B, 1, g, g)
        and scores (B, 1), float32 on the device."""
        box_rows = boxes[rows]
        use_boxes = not np.isnan(box_rows).any()
        point_arr = label_arr = None
        if points is not None and points[rows[0]] is not None:
            coords, labels = points[rows[0]]
            point_arr = np.asarray(coords, dtype=np.float32)[None]
            label_arr = np.asarray(labels, dtype=np.int32)[None]
        prompts = Prompts(
            boxes=box_rows.astype(np.float32) if use_boxes else None,
            points=point_arr,
            labels=label_arr,
        )
        mask_inputs = None
        if mask_logits[rows[0]] is not None:
            stacked = np.stack([mask_logits[i] for i in rows]).astype(np.float32)
            mask_inputs = torch.from_numpy(stacked).reshape(len(rows), 1, *stacked.shape[-2:])
            mask_inputs = mask_inputs.to(self.model.device)
        return self._network(image, prompts, mask_inputs)

    def _network(
        self, image: ImageEmbedding, prompts: Prompts, mask_inputs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SAM.decode`` up to its low-res logits: prompts mapped to the input frame, then
        the prompt encoder and mask decoder in the backend (the full-frame upscaling is
        ours to do). Low-res logits (B, 1, g, g) and scores (B, 1), float32 on the device."""
        size, long_side = image.original_size, self.model.img_size
        boxes = points = None
        if prompts.boxes is not None:
            boxes = scale_boxes(prompts.boxes, size, long_side)
        if prompts.points is not None and prompts.labels is not None:
            points = (scale_coords(prompts.points, size, long_side), prompts.labels)
        low_res, scores = self.backend.decode(
            image.embedding, boxes=boxes, points=points, mask_input=mask_inputs
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
